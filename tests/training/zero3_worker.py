"""One rank of the ZeRO-3 equivalence test (started by torch.distributed.run from the test)."""
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


def main(model_dir: str, out: str, spec: str) -> None:
    cfg = json.loads(spec)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ds = {"train_micro_batch_size_per_gpu": cfg["micro"], "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
          "steps_per_print": 10**9}
    model = load_zero3(model_dir, ds, torch.float32)
    local = sparsify_zero3_(model, 2, 4)
    opt = SRSTEAdamW([p for p in model.parameters() if p.requires_grad], **cfg["opt"])
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    hooks = PartitionedMasks(engine, local)
    local = {n: p.ds_tensor.numel() for n, p in engine.module.named_parameters()}
    flips, snapshots = [], {}
    for step in range(1, cfg["steps"] + 1):
        batch = torch.load(os.path.join(model_dir, f"batch{step}.pt"), weights_only=True)
        x = batch[rank * cfg["micro"] : (rank + 1) * cfg["micro"]]
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        if step % cfg["interval"] == 0:
            flips.append(hooks.recompute())
            snapshots.update({f"step{step}/{n}": m for n, m in full_masks(hooks, f"{out}.step{step}").items()})
    full = {**snapshots, **{f"{n}.mask": m for n, m in full_masks(hooks, f"{out}.final").items()}}
    for name, p in engine.module.named_parameters():
        full[name] = safe_get_full_fp32_param(p).detach().clone()  # the fp32 master
        with deepspeed.zero.GatheredParameters([p]):
            full[f"working/{name}"] = p.detach().clone()  # what the forward computes with
    if rank == 0:
        save_file(full, out)
        with open(out + ".json", "w") as f:
            json.dump({"flips": flips, "local_numel": local, "world": world}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
