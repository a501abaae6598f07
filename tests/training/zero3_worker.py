"""One rank of the ZeRO-3 equivalence tests (started by torch.distributed.run from the tests).

spec["dtype"] "bfloat16" runs DeepSpeed's bf16 path (bf16 working weights, fp32 master); after every step each
rank then checks its own partitions: working == bf16(master) * M bit for bit, the master dense where M prunes."""
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402
from megatron_ast.training.engines import load_zero3, sparsify_zero3_  # noqa: E402
from megatron_ast.training.mask_partitions import PartitionedMasks, masks_from_rank_files  # noqa: E402
from megatron_ast.training.sr_ste import SRSTEAdamW  # noqa: E402


def full_masks(hooks, path: str) -> dict:
    """Every rank writes its mask slices (the checkpoint format); rank 0 assembles the full masks."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    save_file(hooks.state_dict(), f"{path}.rank{rank}")
    torch.distributed.barrier()
    return masks_from_rank_files([f"{path}.rank{r}" for r in range(world)]) if rank == 0 else {}


def partition_checks(hooks) -> dict:
    """This step, over all ranks: working partition == master.to(working dtype) * M bit for bit, and the master's
    pruned elements all nonzero (dense), for every masked weight."""
    ok = torch.tensor([1.0, 1.0])
    for it in hooks.items:
        work, master, mask = it.param.ds_tensor[: it.valid], hooks._fp32(it), hooks._local_mask(it)
        ok[0] *= float(torch.equal(work, master.to(work.dtype) * mask.to(work.dtype)))
        ok[1] *= float(bool((master[~mask] != 0).all()))
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return {"working_is_master_times_mask": bool(ok[0]), "master_dense": bool(ok[1])}


def main(model_dir: str, out: str, spec: str) -> None:
    cfg = json.loads(spec)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ds = {"train_micro_batch_size_per_gpu": cfg["micro"], "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
          "steps_per_print": 10**9}
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    if dtype == torch.bfloat16:
        ds["bf16"] = {"enabled": True}
    model = load_zero3(model_dir, ds, dtype)
    local, _ = sparsify_zero3_(model, 2, 4)
    opt = SRSTEAdamW([p for p in model.parameters() if p.requires_grad], **cfg["opt"])
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    hooks = PartitionedMasks(engine, local)
    local = {n: p.ds_tensor.numel() for n, p in engine.module.named_parameters()}
    flips, snapshots, checks = [], {}, []
    for step in range(1, cfg["steps"] + 1):
        batch = torch.load(os.path.join(model_dir, f"batch{step}.pt"), weights_only=True)
        x = batch[rank * cfg["micro"] : (rank + 1) * cfg["micro"]]
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        if step % cfg["interval"] == 0:
            flips.append(hooks.recompute())
            snapshots.update({f"step{step}/{n}": m for n, m in full_masks(hooks, f"{out}.step{step}").items()})
            for it in hooks.items:  # the master the recompute read
                snapshots[f"step{step}/master/{it.name}"] = safe_get_full_fp32_param(it.param).detach().clone()
        checks.append(partition_checks(hooks))
    stepped = list(opt.state)  # every tensor SRSTEAdamW updated: DeepSpeed hands it the flat masters at step time
    flats = engine.optimizer.fp32_partitioned_groups_flat
    info = {"optimizer_dtypes": sorted({str(p.dtype) for p in stepped}),
            "optimizer_steps_fp32_masters": bool(stepped) and all(any(p is f for f in flats) for p in stepped),
            "working_dtype": str(hooks.items[0].param.ds_tensor.dtype)}
    full = {**snapshots, **{f"{n}.mask": m for n, m in full_masks(hooks, f"{out}.final").items()}}
    for name, p in engine.module.named_parameters():
        full[name] = safe_get_full_fp32_param(p).detach().clone()  # the fp32 master
        with deepspeed.zero.GatheredParameters([p]):
            full[f"working/{name}"] = p.detach().clone()  # what the forward computes with
    if rank == 0:
        save_file(full, out)
        with open(out + ".json", "w") as f:
            json.dump({"flips": flips, "local_numel": local, "world": world, "checks": checks, **info}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
