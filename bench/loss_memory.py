"""The distillation loss's working memory at Llama-3's vocabulary: chunked (training/distillation.py) vs the
whole-batch formulation it replaced, in one process on the same logits.

The logits are made first (student bf16 with a gradient, teacher bf16, as a bf16 run's model hands them
over); what is measured is every tensor the loss makes on top of them, forward and backward (autograd's
saved tensors included; bench/machine.py's TensorBytes), at --tokens x --vocab, T = 1 and T = 2. Writes
bench/results/loss_memory-<name>.json. Per GPU at another shape, both scale linearly in tokens x vocab:
the chunked one's extra is one gradient in the logits' dtype plus a constant (a few chunks of
CHUNK_BYTES); the whole-batch one's is about 16 x that gradient.

    python bench/loss_memory.py [--tokens 2048 --vocab 128256 --name vm --device cpu]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from machine import TensorBytes, write_result  # noqa: E402
from megatron_ast.training.distillation import CHUNK_BYTES, DistillConfig, distillation_loss  # noqa: E402


def unchunked(s: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, cfg: DistillConfig):
    """The loss before chunking (main at f1113f1): autograd through whole-batch fp32 log-softmaxes. Returns the
    loss and the per-token CE and KL (the tests' reference too)."""
    sf, tf, T = s[:, :-1].float(), t[:, :-1].float(), cfg.temperature
    ce = F.cross_entropy(sf.reshape(-1, sf.shape[-1]), labels[:, 1:].reshape(-1))
    log_p_t, log_p_s = F.log_softmax(tf / T, -1), F.log_softmax(sf / T, -1)
    kl_rows = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    ce_rows = -F.log_softmax(sf, -1).gather(-1, labels[:, 1:, None])[..., 0]
    return cfg.w_task * ce + cfg.w_kl * T * T * kl_rows.mean(), ce_rows, kl_rows


def _measure(fn, s: torch.Tensor) -> dict:
    s.grad = None
    cuda = s.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with TensorBytes() as mem:
        fn().backward()
    if cuda:
        torch.cuda.synchronize()
    out = {"peak_gib": mem.peak / 2**30, "seconds": time.perf_counter() - t0}
    if cuda:  # the allocator's own count, beside the tracker's
        out["cuda_allocator_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128_256)
    ap.add_argument("--name", default="vm")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.manual_seed(0)
    B, L = 2, a.tokens // 2
    s = (torch.randn(B, L, a.vocab, device=a.device) * 3).to(torch.bfloat16).requires_grad_()
    t = (torch.randn(B, L, a.vocab, device=a.device) * 3).to(torch.bfloat16)
    labels = torch.randint(0, a.vocab, (B, L), device=a.device)
    logits_gib = s.numel() * s.element_size() / 2**30
    rows = {}
    for T in (1.0, 2.0):
        cfg = DistillConfig(0.33, 0.67, 0.0, T)
        before = _measure(lambda: unchunked(s, labels, t, cfg)[0], s)
        after = _measure(lambda: distillation_loss(s, labels, cfg, t)["loss"], s)
        rows[f"T={T:g}"] = {"before": before, "after": after,
                            "peak_before_over_after": before["peak_gib"] / after["peak_gib"]}
        print(f"T={T:g}: whole-batch {before['peak_gib']:.2f} GiB ({before['seconds']:.1f} s), chunked "
              f"{after['peak_gib']:.2f} GiB ({after['seconds']:.1f} s): {before['peak_gib'] / after['peak_gib']:.1f}x less"
              f"; one bf16 logits tensor is {logits_gib:.2f} GiB")
    write_result("loss_memory", a.name, {
        "command": " ".join(["python", "bench/loss_memory.py", *sys.argv[1:]]), "tokens": B * L, "vocab": a.vocab,
        "logits_dtype": "bfloat16", "device": a.device, "one_logits_tensor_gib": logits_gib, "chunk_bytes": CHUNK_BYTES,
        "measured": "every tensor the loss makes above the given logits, forward + backward (TensorBytes)",
        "results": rows})


if __name__ == "__main__":
    main()
