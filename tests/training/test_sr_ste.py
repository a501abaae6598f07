import math

import pytest
import torch

from megatron_ast.training.sr_ste import SRSTEAdamW, srste_lambda


def _reference(w, grads, pruned, lr, b1, b2, eps, wd, lam, t_inc, v_of="update"):
    """The update rule of DESIGN.md §4, written out element by element (v_of="gradient": v tracks g^2)."""
    w = [float(x) for x in w]
    m = [0.0] * len(w)
    v = [0.0] * len(w)
    for t, g in enumerate(grads, 1):
        lam_t = lam * min(1.0, t / t_inc)
        for i in range(len(w)):
            m[i] = b1 * m[i] + (1 - b1) * float(g[i])
            u = m[i] + lam_t * w[i] * float(pruned[i])
            v[i] = b2 * v[i] + (1 - b2) * (u if v_of == "update" else float(g[i])) ** 2
            step = (u / (1 - b1**t)) / (math.sqrt(v[i] / (1 - b2**t)) + eps)
            w[i] = w[i] * (1 - lr * wd) - lr * step
    return torch.tensor(w)


def _trained(w0, grads, pruned=None, optimizer=SRSTEAdamW, **kw) -> torch.Tensor:
    """w0 after one optimizer step per gradient."""
    p = torch.nn.Parameter(w0.clone())
    opt = optimizer([p], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kw)
    if pruned is not None:
        opt.set_pruned(p, pruned)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def test_matches_the_written_out_rule_and_decays_only_pruned_weights():
    torch.manual_seed(0)
    w0 = torch.randn(16, dtype=torch.float64)
    pruned = (torch.arange(16) % 2).double()
    grads = [torch.randn(16, dtype=torch.float64) * 0.01 for _ in range(7)]
    p = _trained(w0, grads, pruned, srste_lambda=0.5, srste_t_inc=4)
    ref = _reference(w0, grads, pruned, 1e-2, 0.9, 0.95, 1e-8, 0.1, 0.5, 4).double()
    assert torch.allclose(p, ref, atol=1e-12)
    # without an indicator it is exactly torch's AdamW
    assert torch.allclose(_trained(w0, grads), _trained(w0, grads, optimizer=torch.optim.AdamW), atol=1e-12)
    # lambda = 0 keeps AST's second moment (v of m^2, as the reference's adamw.py): AST without SR-STE's decay
    no_decay = _trained(w0, grads, pruned, srste_lambda=0.0, srste_t_inc=4)
    assert torch.allclose(no_decay, _reference(w0, grads, pruned, 1e-2, 0.9, 0.95, 1e-8, 0.1, 0.0, 4).double(),
                          atol=1e-12)
    adamw = _trained(w0, grads, optimizer=torch.optim.AdamW)
    assert (no_decay - adamw).abs().max() > 1e-4
    # lambda = 0 with AdamW's second moment (the baselines) is torch's AdamW even with an indicator (to rounding: the
    # CPU step is one fused kernel, torch's AdamW a chain of them)
    assert torch.allclose(_trained(w0, grads, pruned, srste_lambda=0.0, srste_t_inc=4, second_moment="gradient"), adamw,
                          atol=1e-12)
    # AdamW's second moment with the decay in the update
    assert torch.allclose(_trained(w0, grads, pruned, srste_lambda=0.5, srste_t_inc=4, second_moment="gradient"),
                          _reference(w0, grads, pruned, 1e-2, 0.9, 0.95, 1e-8, 0.1, 0.5, 4, "gradient").double(),
                          atol=1e-12)
    # the decay moves exactly the pruned entries: compare with the same rule at a lambda too small to add to m
    z = _trained(w0, grads, pruned, srste_lambda=1e-300, srste_t_inc=4)
    moved = (p - z).abs() > 1e-9
    assert torch.equal(moved, pruned.bool())
    assert ((p.abs() < z.abs()) == pruned.bool()).all()  # pulled toward zero


def test_a_flat_tensor_mixing_masked_and_plain_elements():
    """What ZeRO-3 hands the optimizer: masked weights (indicator 0/1) beside others (-1) in one flat tensor."""
    torch.manual_seed(1)
    w0 = torch.randn(12, dtype=torch.float64)
    ind = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0, -1, -1, -1, -1], dtype=torch.float64)
    grads = [torch.randn(12, dtype=torch.float64) * 0.01 for _ in range(5)]
    flat = torch.nn.Parameter(w0.clone())
    opt = SRSTEAdamW([flat], lr=1e-2, weight_decay=0.1, srste_lambda=0.5, srste_t_inc=2)
    opt.set_pruned(flat, ind)
    masked, plain = torch.nn.Parameter(w0[:8].clone()), torch.nn.Parameter(w0[8:].clone())
    a = SRSTEAdamW([masked], lr=1e-2, weight_decay=0.1, srste_lambda=0.5, srste_t_inc=2)
    a.set_pruned(masked, ind[:8])
    b = torch.optim.AdamW([plain], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for g in grads:
        flat.grad, masked.grad, plain.grad = g.clone(), g[:8].clone(), g[8:].clone()
        opt.step(), a.step(), b.step()
    assert torch.allclose(flat[:8], masked, atol=1e-12) and torch.allclose(flat[8:], plain, atol=1e-12)


def test_an_update_does_not_depend_on_how_tensors_are_grouped():
    """fp32, bit for bit: plain elements inside a flat partition (indicator -1) get exactly the update they get
    stepped alone (None), so ZeRO-3's flattening cannot move a 2-rank run off its 1-process reference."""
    torch.manual_seed(2)
    w0 = torch.randn(4096) * 0.02
    ind = torch.cat([torch.randint(0, 2, (2048,)).float(), torch.full((2048,), -1.0)])
    flat, alone = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0[2048:].clone())
    opt, ref = (SRSTEAdamW([t], lr=3e-3, weight_decay=0.1, srste_lambda=0.3) for t in (flat, alone))
    opt.set_pruned(flat, ind)
    for _ in range(4):
        g = torch.randn(4096) * 1e-3
        flat.grad, alone.grad = g.clone(), g[2048:].clone()
        opt.step(), ref.step()
    assert torch.equal(flat[2048:], alone)


def test_lambda_schedule_ramps_then_holds():
    assert srste_lambda(0, 1e-4, 100) == 0.0
    assert srste_lambda(50, 1e-4, 100) == pytest.approx(5e-5)
    assert srste_lambda(1000, 1e-4, 100) == 1e-4
    opt = SRSTEAdamW([torch.nn.Parameter(torch.zeros(2))], srste_lambda=1e-4, srste_t_inc=10)
    assert opt.current_lambda() == 0.0


def test_indicator_shape_is_checked():
    p = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="does not match"):
        SRSTEAdamW([p]).set_pruned(p, torch.zeros(5))


def test_a_masked_tensor_the_step_never_sees_is_an_error():
    """DeepSpeed hands the optimizer its flat partitions at step time; if they are not the tensors the masks were
    declared on, AST would silently run plain AdamW there: the step says so instead."""
    from megatron_ast.errors import DeepSpeedMismatch

    declared, stepped = torch.nn.Parameter(torch.zeros(8)), torch.nn.Parameter(torch.zeros(8))
    opt = SRSTEAdamW([stepped])
    opt.set_pruned(declared, torch.zeros(8))
    stepped.grad = torch.ones(8)
    with pytest.raises(DeepSpeedMismatch, match="did not get 1 of the 1 tensors that hold masked weights"):
        opt.step()


@pytest.mark.parametrize("second_moment", ["update", "gradient"])
def test_the_fused_cpu_step_is_the_accelerators_rule(second_moment):
    """fp32, a flat partition as ZeRO-Offload steps it: the C loop (training/srste_cpu.c) against the whole-tensor
    torch kernels an accelerator runs, to float32 rounding, over several steps."""
    torch.manual_seed(3)
    n = 100_003  # not a multiple of any vector width: the loop's tail too
    ind = torch.randint(-1, 2, (n,), dtype=torch.int8)
    fused = torch.nn.Parameter(torch.randn(n) * 0.02)
    eager = torch.nn.Parameter(fused.detach().clone())
    opt = SRSTEAdamW([fused], lr=3e-3, weight_decay=0.1, srste_lambda=0.01, srste_t_inc=2, second_moment=second_moment)
    opt.set_pruned(fused, ind)
    group, m, v = opt.param_groups[0], torch.zeros(n), torch.zeros(n)
    for t in range(1, 5):
        g = torch.randn(n) * 1e-3
        fused.grad = g.clone()
        opt.step()
        with torch.no_grad():
            SRSTEAdamW._update(group, t, eager.data, g, m, v, ind, second_moment == "update")
    assert torch.allclose(fused, eager, rtol=1e-4, atol=1e-6)  # float32, summed in another order
    assert not torch.equal(fused, opt.state[fused]["exp_avg"])  # it did step
