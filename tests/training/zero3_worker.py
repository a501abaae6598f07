"""One rank of the ZeRO-3 equivalence test (started by torch.distributed.run from the test)."""
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from megatron_ast.training.engines import load_zero3, sparsify_zero3_  # noqa: E402
from megatron_ast.training.mask_partitions import PartitionedMasks  # noqa: E402
from megatron_ast.training.sr_ste import SRSTEAdamW  # noqa: E402


def hooks_modules(engine):
    from megatron_ast.sparsity.sparse_linear import sparse_linears

    return sorted(sparse_linears(engine.module).items())


def main(model_dir: str, out: str, spec: str) -> None:
    cfg = json.loads(spec)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ds = {"train_micro_batch_size_per_gpu": cfg["micro"], "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
          "steps_per_print": 10**9}
    model = load_zero3(model_dir, ds, torch.float32)
    sparsify_zero3_(model, 2, 4)
    opt = SRSTEAdamW([p for p in model.parameters() if p.requires_grad], **cfg["opt"])
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    hooks = PartitionedMasks(engine)
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
            for name, mod in hooks_modules(engine):
                with deepspeed.zero.GatheredParameters([mod.mask]):
                    snapshots[f"step{step}/{name}"] = mod.mask.detach().clone()
    full = dict(snapshots)
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            full[name] = p.detach().clone()
    if rank == 0:
        save_file(full, out)
        with open(out + ".json", "w") as f:
            json.dump({"flips": flips, "local_numel": local, "world": world}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
