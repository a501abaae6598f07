"""bench/ast_heldout_pairs.py: caches of the same windows merge and pair; caches of other windows are refused."""
import os

import numpy as np
import pytest

from tests.bench.scripts import load


@pytest.fixture(scope="module")
def bench():
    return load("ast_heldout_pairs")


SETTINGS = {"model": "m", "seq_len": 33, "windows": 40, "training_windows": 8, "validation": ["v"], "init": "p"}


def _cache(rng, runs: dict[str, float], dense: dict, init_level: float, **settings) -> dict:
    nll = lambda level: {d: ((level + rng.normal(0, 0.3, 40)) * 32).tolist() for d in ("book", "docs")}  # noqa: E731
    return {"settings": {**SETTINGS, **settings}, "scored": {
        "dense": {"nll": dense}, "init": {"nll": nll(init_level)},
        **{k: {"nll": nll(level), "label": k.upper()} for k, level in runs.items()}}}


def test_runs_of_two_caches_are_paired_on_the_same_windows(bench):
    rng = np.random.default_rng(0)
    dense = {d: ((2.0 + rng.normal(0, 0.3, 40)) * 32).tolist() for d in ("book", "docs")}
    a = _cache(rng, {"/r/ast": 2.5, "/r/naive": 2.6}, dense, 3.0)
    moved = {d: (np.asarray(v) * (1 + 3e-6)).tolist() for d, v in dense.items()}  # another CPU's rounding
    b = _cache(rng, {"/r/ast": 9.9, "/r/ast_b": 2.5}, moved, 3.1, init="q")  # the first cache's /r/ast is kept
    nll, labels = bench.merge({"vm": a, "vm-b": b})
    assert set(nll) == {"dense", "init", "init (vm-b)", "/r/ast", "/r/naive", "/r/ast_b"}
    assert nll["/r/ast"] == a["scored"]["/r/ast"]["nll"] and labels["/r/ast_b"] == "/R/AST_B"
    # the second cache's run: every window 0.05 nats/token above the first cache's AST, so paired across the
    # caches its interval collapses onto that shift
    nll["/r/ast_b"] = {d: (np.asarray(v) + 0.05 * 32).tolist() for d, v in nll["/r/ast"].items()}
    stats = bench.pairs(nll, 33, "/r/ast", 300, {"docs"})
    assert set(stats) == {"held out", "out of domain"}
    held = stats["held out"]
    assert held["/r/ast"]["log_ratio"] == 0.0
    assert held["/r/ast_b"]["log_ratio_ci"] == pytest.approx([0.05, 0.05])
    lo, hi = held["/r/naive"]["log_ratio_ci"]
    assert lo < held["/r/naive"]["log_ratio"] < hi and hi - lo > 0.02  # independent noise: a real interval
    assert held["/r/naive"]["ppl"] == pytest.approx(np.exp(np.mean(a["scored"]["/r/naive"]["nll"]["book"]) / 32))
    assert stats["out of domain"]["/r/naive"]["ppl"] == pytest.approx(
        np.exp(np.mean(a["scored"]["/r/naive"]["nll"]["docs"]) / 32))
    t = bench.table(stats, labels, "/r/ast")
    assert f"| /R/NAIVE ({os.path.relpath('/r/naive')}) | " in t and t.count("\n") == 1 + len(nll)


def test_caches_of_other_windows_are_refused(bench):
    rng = np.random.default_rng(1)
    dense = {d: ((2.0 + rng.normal(0, 0.3, 40)) * 32).tolist() for d in ("book", "docs")}
    a = _cache(rng, {"/r/ast": 2.5}, dense, 3.0)
    other = {d: (np.asarray(v) + 5.0).tolist() for d, v in dense.items()}
    with pytest.raises(SystemExit, match="dense model's NLLs on domain .* differ"):
        bench.merge({"vm": a, "vm-b": _cache(rng, {}, other, 3.0)})
    with pytest.raises(SystemExit, match="another model, seq_len or window count"):
        bench.merge({"vm": a, "vm-b": _cache(rng, {}, dense, 3.0, windows=32)})
