import pytest
import torch

from megatron_ast.errors import UsageError
from megatron_ast.quantization.gptq import gptq
from megatron_ast.quantization.groupwise import QuantSpec, dequantize, expand, rtn
from megatron_ast.quantization.pack24 import nbytes, pack, unpack
from megatron_ast.sparsity import nm_mask, nm_violations


def _masked(out_f=64, in_f=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    return w, nm_mask(w.abs(), 2, 4)


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_error_is_at_most_half_a_step_and_zeros_stay_zero(bits):
    w, mask = _masked()
    spec = QuantSpec(bits, 128)
    codes, scales = rtn(w, mask, spec)
    deq = dequantize(codes, scales, spec)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == (64, 2)
    assert bool((deq[~mask] == 0).all()) and nm_violations(deq, 2, 4) == 0
    assert bool(((w * mask - deq).abs() <= expand(scales.float(), spec) / 2 * 1.01).all())
    assert int(codes.max()) <= spec.qmax and int(codes.min()) >= -spec.qmax - 1


def test_gptq_keeps_the_pattern_and_beats_rtn_on_correlated_inputs():
    w, mask = _masked(32, 256, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2048, 32, generator=g) @ torch.randn(32, 256, generator=g) + 0.1 * torch.randn(2048, 256, generator=g)
    h = x.t() @ x / x.shape[0]
    spec = QuantSpec(4, 128)
    codes, scales = gptq(w, h, mask, spec)
    q = dequantize(codes, scales, spec)
    assert bool((q[~mask] == 0).all()) and nm_violations(q, 2, 4) == 0
    r = dequantize(*rtn(w, mask, spec), spec)
    err = lambda a: float((((w * mask - a) @ x.t()) ** 2).sum())  # noqa: E731
    assert err(q) < 0.8 * err(r)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_round_trip_and_honest_size(bits):
    w, mask = _masked(128, 512)
    spec = QuantSpec(bits, 128)
    codes, scales = rtn(w, mask, spec)
    packed = pack(codes, mask, spec)
    assert torch.equal(unpack(packed, spec), codes)
    ratio = w.numel() * 4 / nbytes(packed, scales)
    assert ratio == pytest.approx(32 / (bits / 2 + 1 + 16 / 128))  # 10.24x (int4), 6.24x (int8)
    assert ratio >= 10 if bits == 4 else ratio > 6


def test_pack_refuses_a_mask_that_is_not_2of4():
    w, mask = _masked()
    mask[0, :4] = True
    with pytest.raises(UsageError, match="exactly 2 kept"):
        pack(rtn(w, mask, QuantSpec())[0], mask, QuantSpec())
    with pytest.raises(UsageError, match="choose 4 or 8"):
        QuantSpec(3)
