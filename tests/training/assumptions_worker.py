"""One process of tests/training/test_deepspeed_assumptions.py: a real ZeRO-3 engine (world 1, gloo), one of
DeepSpeed's internals broken on purpose before (or after) PartitionedMasks reads it; prints the error as JSON."""
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402

from megatron_ast.errors import UsageError  # noqa: E402
from megatron_ast.training.engines import load_zero3, sparsify_zero3_  # noqa: E402
from megatron_ast.training.mask_partitions import PartitionedMasks  # noqa: E402
from megatron_ast.training.sr_ste import SRSTEAdamW  # noqa: E402

DS = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3},
      "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}


def engine(optimizer=SRSTEAdamW):
    model = load_zero3(sys.argv[1], DS, torch.float32)
    local, _ = sparsify_zero3_(model, 2, 4)
    eng, *_ = deepspeed.initialize(model=model, optimizer=optimizer(model.parameters(), lr=1e-3), config=DS)
    return eng, local


def step(eng) -> None:
    x = torch.randint(0, 64, (1, 8))
    eng.backward(eng(input_ids=x, labels=x).loss)
    eng.step()


def case(name: str) -> None:
    if name == "plain_adamw":  # DeepSpeed stepping another optimizer than ours
        eng, local = engine(torch.optim.AdamW)
        PartitionedMasks(eng, local)
        return
    eng, local = engine()
    zero = eng.optimizer
    if name == "offsets":  # a flat master that the partitions do not add up to
        zero.fp32_partitioned_groups_flat[0] = zero.fp32_partitioned_groups_flat[0][:-4]
    elif name == "master_is_working":  # the stage3 branch that reuses the working partition as the master
        zero.fp32_partitioned_groups_flat[0] = zero.fp16_partitioned_groups_flat[0]
    elif name == "working_offset":  # a masked weight's working partition moved out of its flat buffer
        p = next(m.weight for m in eng.module.modules() if type(m).__name__ == "SparseLinear")
        moved = p.ds_tensor.clone()
        moved.ds_numel = p.ds_tensor.ds_numel
        p.ds_tensor = moved
    elif name == "partial_offload":
        zero.partial_offload = 0.5
    masks = PartitionedMasks(eng, local)
    if name == "not_stepped":  # DeepSpeed handing the optimizer other tensors than the declared flat masters
        zero.fp32_partitioned_groups_flat[0] = zero.fp32_partitioned_groups_flat[0].clone()
    elif name != "none":
        return
    step(eng)
    masks.recompute()


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    name = sys.argv[2]
    try:
        case(name)
        out[name] = None
    except UsageError as e:
        out[name] = str(e)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
