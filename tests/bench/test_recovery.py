"""bench/recovery.py: the arithmetic, tables, plots and statistics of its four subcommands (run, lr, heldout,
pairs); the training and scoring of real runs are the bench's, not a test's."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_tools.preprocess import preprocess
from megatron_ast.eval.perplexity import token_windows
from tests.bench.scripts import load
from tests.conftest import stdlib_texts, write_jsonl


@pytest.fixture(scope="module")
def bench():
    return load("recovery")


# --- run ---------------------------------------------------------------------------------------------------------
def _ppl(v: float) -> dict:
    return {"book": {"ppl": v * 2}, "github": {"ppl": v / 2}, "all": {"ppl": v}}


def test_gap_closed_is_in_log_perplexity(bench):
    assert bench.gap_closed(100.0, 100.0, 10.0) == 0.0 and bench.gap_closed(100.0, 10.0, 10.0) == pytest.approx(1.0)
    assert bench.gap_closed(100.0, math.sqrt(1000.0), 10.0) == pytest.approx(0.5)  # halfway in log space
    assert bench.gap_closed(100.0, 200.0, 10.0) < 0  # worse than the start


def test_every_ablation_changes_one_thing(bench):
    assert bench.METHODS["ast"][1] == {} and len(bench.METHODS) == 16
    pruned_dense = bench.METHODS["ast_pruned_dense"][1]
    for name, (_, over) in bench.METHODS.items():
        if name == "ast_dense_slorb_zero":  # one change on top of the dense-values row
            assert {k: v for k, v in over.items() if k not in pruned_dense} == {"slorb": {**bench.SLORB, "init": "zero"}}
            assert all(over[k] == v for k, v in pruned_dense.items())
        elif name.startswith("ast_"):
            assert len(over) == 1, name


def test_every_method_is_a_valid_run_config(bench, tmp_path):
    """Each row's run.yaml as the bench writes it loads through the trainer's own validation."""
    from types import SimpleNamespace

    from megatron_ast.training.config import load_config

    pruned = tmp_path / "pruned"
    pruned.mkdir()
    (pruned / "masks.safetensors").write_bytes(b"")
    (pruned / "sparsity_report.json").write_text(json.dumps({"slorb": {"group": bench.SLORB["group"]}}))
    args = SimpleNamespace(steps=16, seq_len=64, lr=1e-4, eval_every=8, windows=2, checkpoint_every=8,
                           ds_config="ds.json")
    shards = {"train": tmp_path / "train", "validation": tmp_path / "val"}
    for name, (_, over) in bench.METHODS.items():
        cfg = bench.method_config(name, "model", pruned, shards, tmp_path / name, args)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        run = load_config(tmp_path / f"{name}.yaml")
        assert run.method == over.get("method", "ast"), name
    ce = load_config(tmp_path / "dense_ce.yaml")
    assert ce.student_dir == ce.model and ce.distill.w_kl == 0 and ce.slorb is None  # the dense model, task loss
    kd = load_config(tmp_path / "dense_kd.yaml")
    assert kd.student_dir == kd.model and kd.distill == load_config(tmp_path / "ast.yaml").distill


def test_table_and_plots(bench, tmp_path):
    curve = [{"step": s, "tokens": 1024 * s, "ppl": _ppl(40 - s)} for s in (0, 8, 16)]
    results = {"model": "m", "seq_len": 256, "dense_ppl": _ppl(20.0), "init_ppl": _ppl(40.0), "methods": {
        "ast": {"label": "AST", "curve": curve, "final_ppl": _ppl(24.0), "gap_closed": 0.74, "tokens": 16384,
                "train_seconds": 10.0, "final_flip_rate_init": 0.01,
                "flips": [{"step": 4, "flip_rate_prev": 0.01, "flip_rate_init": 0.01, "sparsity": 0.5}]},
        "naive": {"label": "naive", "curve": curve, "final_ppl": _ppl(30.0), "gap_closed": 0.4, "tokens": 16384,
                  "train_seconds": 9.0, "final_flip_rate_init": None, "flips": []}}}
    bench.run_plot(results, tmp_path / "a.png", tmp_path / "f.png")
    for png in ("a.png", "f.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = bench.run_table(results).splitlines()
    assert len(rows) == 2 + 4 and "| AST | 48.00 | 12.00 | 24.00 | 74.0% | 0.0100 | 16,384 | 10 |" in rows
    assert rows[-1].startswith("| dense (target) | 40.00")


# --- lr --------------------------------------------------------------------------------------------------------------
def _write(d: Path, name: str, steps: int, lr: float, finals: dict[str, float]) -> None:
    ppl = lambda v: {"all": {"ppl": v}}  # noqa: E731
    methods = {m: {"label": m.upper(), "final_ppl": ppl(v), "gap_closed": 0.5,
                   "curve": [{"tokens": 0, "ppl": ppl(40.0)}, {"tokens": steps * 1024, "ppl": ppl(v)}]}
               for m, v in finals.items()}
    r = {"settings": {"steps": steps, "seq_len": 256, "windows": 8, "tokens_per_step": 1024, "lr": lr},
         "dense_ppl": ppl(20.0), "init_ppl": ppl(44.0), "methods": methods}
    (d / f"ast_ablation-{name}.json").write_text(json.dumps(r))


def test_a_sweep_is_name_and_its_lr_files(bench, tmp_path):
    _write(tmp_path, "vm", 16, 1e-4, {"ast": 30.0, "naive": 33.0, "ast_no_slorb": 29.9})
    _write(tmp_path, "vm-lr3e-4", 16, 3e-4, {"ast": 46.0, "naive": 29.8})
    _write(tmp_path, "vm-s48-lr5e-5", 48, 5e-5, {"ast": 25.0})  # another budget: not part of "vm"
    c = bench.lr_collect(tmp_path, "vm")
    assert set(c["points"]) == {"ast", "naive"}  # the ablation measured at one lr only is not a sweep row
    assert c["points"]["naive"][1e-4][1] == 33.0 and bench.best_lr(c["points"]["naive"]) == 3e-4
    assert bench.best_lr(c["points"]["ast"]) == 1e-4 and c["tokens"] == 16 * 1024
    assert "| AST | 30.00 (50.0%) | 46.00 (50.0%) |" in bench.lr_table(c)
    c48 = bench.lr_collect(tmp_path, "vm-s48")
    assert c48["points"] == {"ast": {5e-5: ("AST", 25.0, 0.5)}} and c48["curves"]["ast"][5e-5][-1] == (48 * 1024, 25.0)
    bench.lr_plot(c, tmp_path / "lr.png", tmp_path / "best.png")
    assert (tmp_path / "best.png").stat().st_size > 5000
    _write(tmp_path, "vm-lr6e-4", 32, 6e-4, {"ast": 30.0})
    with pytest.raises(SystemExit, match="other steps"):
        bench.lr_collect(tmp_path, "vm")
    with pytest.raises(SystemExit, match="no bench/results"):
        bench.lr_collect(tmp_path, "h100")


# --- heldout ---------------------------------------------------------------------------------------------------------
def test_heldout_windows_are_not_the_training_ones(bench, hf_tokenizer_dir, tmp_path):
    src = write_jsonl(tmp_path / "github" / "val.jsonl", stdlib_texts(20))
    preprocess([str(src)], tmp_path / "shards", hf_tokenizer_dir)
    data = [str(tmp_path / "shards")]
    used = token_windows(data, hf_tokenizer_dir, 64, 8)["github"]
    everything = token_windows(data, hf_tokenizer_dir, 64, None)["github"]
    held = bench.heldout_windows(data, str(hf_tokenizer_dir), 64, 8, 16)["github"]
    assert held.shape == (16, 64)
    rows = {r.tobytes() for r in everything}
    assert all(r.tobytes() in rows for r in held)  # real windows of the stream
    assert not {r.tobytes() for r in held} & {r.tobytes() for r in used}
    assert len({r.tobytes() for r in held}) == 16
    with pytest.raises(SystemExit, match="fewer than --windows"):
        bench.heldout_windows(data, str(hf_tokenizer_dir), 64, 8, len(everything))


def _nll(rng, n, seq_len, level):
    return {d: (level + rng.normal(0, 0.3, n)) * (seq_len - 1) for d in ("book", "github")}


def test_bootstrap_is_paired_and_anchored(bench):
    rng = np.random.default_rng(1)
    seq_len = 33
    dense, init = _nll(rng, 40, seq_len, 2.0), _nll(rng, 40, seq_len, 3.0)
    base = _nll(rng, 40, seq_len, 2.5)
    shifted = {d: v + 0.1 * (seq_len - 1) for d, v in base.items()}  # every window 0.1 nats/token worse
    noisy = {d: v + rng.normal(0, 0.5, len(v)) * (seq_len - 1) for d, v in base.items()}
    s = bench.bootstrap({"dense": dense, "init": init, "base": base, "shifted": shifted, "noisy": noisy},
                        seq_len, "base", boot=500)
    assert s["dense"]["gap_closed"] == pytest.approx(1.0) and s["init"]["gap_closed"] == pytest.approx(0.0)
    assert s["base"]["log_ratio"] == 0.0 and s["base"]["log_ratio_ci"] == [0.0, 0.0]
    # a constant per-window shift is known exactly: the paired interval collapses onto it
    assert s["shifted"]["log_ratio"] == pytest.approx(0.1) and s["shifted"]["log_ratio_ci"] == pytest.approx([0.1, 0.1])
    lo, hi = s["noisy"]["log_ratio_ci"]
    assert lo < s["noisy"]["log_ratio"] < hi and hi - lo > 0.05
    lo, hi = s["base"]["gap_closed_ci"]
    assert lo < s["base"]["gap_closed"] < hi
    mean = np.mean(np.concatenate(list(base.values()))) / (seq_len - 1)
    assert s["base"]["ppl"] == pytest.approx(math.exp(mean))


def test_table_and_plot(bench, tmp_path):
    stats = {k: {"ppl": p, "gap_closed": g, "gap_closed_ci": [g - 0.1, g + 0.1], "log_ratio": r,
                 "log_ratio_ci": [r - 0.01, r + 0.01]}
             for k, p, g, r in [("dense", 20.0, 1.0, -0.4), ("init", 44.0, 0.0, 0.4), ("a", 30.0, 0.5, 0.0),
                                ("b", 29.0, 0.55, -0.03)]}
    runs = {"dense": {"label": "dense (target)", "lr": None, "tokens": None},
            "init": {"label": "one-shot", "lr": None, "tokens": None},
            "a": {"label": "naive", "lr": 3e-4, "tokens": 16384}, "b": {"label": "AST", "lr": 5e-5, "tokens": 16384}}
    results = {"stats": stats, "runs": runs, "baseline": "a", "order": ["dense", "init", "a", "b"],
               "settings": {"windows": 64, "seq_len": 256}}
    t = bench.heldout_table(results)
    assert "| AST | 5e-05 | 16,384 | 29.00 | 55.0% (45.0, 65.0) | -3.0% (-3.9%, -2.0%) |" in t
    assert "| dense (target) | - | - | 20.00 |" in t
    bench.heldout_plot(results, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 5000
    # text no run trained on: its own columns and markers
    results["ood_stats"] = {k: {**v, "ppl": v["ppl"] + 1, "log_ratio": 2 * v["log_ratio"],
                                    "log_ratio_ci": [2 * c for c in v["log_ratio_ci"]]} for k, v in stats.items()}
    t = bench.heldout_table(results)
    assert "| AST | 5e-05 | 16,384 | 29.00 | 55.0% (45.0, 65.0) | -3.0% (-3.9%, -2.0%) | 30.00 | -5.8% (-7.7%, -3.9%) |" in t
    assert t.splitlines()[1].count("|") == t.splitlines()[0].count("|") == 9
    bench.heldout_plot(results, tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > (tmp_path / "p.png").stat().st_size
    results["target_gaps"] = {"a": {k: {"gap_closed": 0.25, "gap_closed_ci": [0.2, 0.3]} for k in stats}}
    t = bench.heldout_table(results).splitlines()
    assert "gap closed to naive (95% CI)" in t[0] and t[1].count("|") == t[0].count("|") == 10
    assert "| 55.0% (45.0, 65.0) | -3.0% (-3.9%, -2.0%) | 25.0% (20.0, 30.0) | 30.00 |" in t[-1]


def test_lm_eval_docs_is_prose_of_its_own_domain(bench, hf_tokenizer_dir, tmp_path):
    out = bench.lm_eval_docs(tmp_path / "docs" / "readmes.jsonl")
    lines = out.read_text().splitlines()
    assert len(lines) > 100 and all(json.loads(line)["text"] for line in lines)
    assert bench.lm_eval_docs(out) == out and out.read_text().splitlines() == lines  # kept, not rebuilt
    w = token_windows([str(out)], hf_tokenizer_dir, 64, 16)
    assert list(w) == ["docs"] and w["docs"].shape == (16, 64)


def test_a_scored_run_needs_no_dir_but_an_unscored_one_does(bench, tmp_path):
    kept, new, gone = tmp_path / "kept", tmp_path / "new", tmp_path / "gone"
    for r in (kept, new):
        r.mkdir()
        (r / "run.yaml").write_text("steps: 1\n")
    scored = {str(kept): {}, str(tmp_path / "deleted"): {}}
    nll_json = tmp_path / "ast_heldout-vm-nll.json"
    assert bench.runs_to_score([kept, tmp_path / "deleted", new], scored, nll_json) == [new]
    with pytest.raises(SystemExit, match=r"gone.*no run.yaml and not scored before in .*ast_heldout-vm-nll.json"):
        bench.runs_to_score([kept, gone], scored, nll_json)


def test_the_gap_starts_at_the_first_one_shot_init_among_the_runs(bench, tmp_path):
    gmp = {"method": "gmp", "init": "magnitude"}  # starts dense: not the gap's start
    naive = {"method": "naive", "init": str(tmp_path / "pruned")}
    fitted = {"method": "ast", "init": str(tmp_path / "pruned-slorb16")}
    assert bench.one_shot_start([gmp, naive, fitted]) == str((tmp_path / "pruned").resolve())
    # runs scored before, their dirs gone: their start is the cache's
    assert bench.one_shot_start([gmp], cached="/cache/pruned") == "/cache/pruned"
    assert bench.one_shot_start([naive, gmp], cached="/cache/pruned") == str((tmp_path / "pruned").resolve())
    with pytest.raises(SystemExit, match="no --runs run starts from a one-shot pruned dir"):
        bench.one_shot_start([gmp, {"method": "dense", "init": "magnitude"}])


# --- pairs -----------------------------------------------------------------------------------------------------------
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
    nll, labels = bench.pairs_merge({"vm": a, "vm-b": b})
    assert set(nll) == {"dense", "init", "init (vm-b)", "/r/ast", "/r/naive", "/r/ast_b"}
    assert nll["/r/ast"] == a["scored"]["/r/ast"]["nll"] and labels["/r/ast_b"] == "/R/AST_B"
    # the second cache's run: every window 0.05 nats/token above the first cache's AST, so paired across the
    # caches its interval collapses onto that shift
    nll["/r/ast_b"] = {d: (np.asarray(v) + 0.05 * 32).tolist() for d, v in nll["/r/ast"].items()}
    stats = bench.pairs_stats(nll, 33, "/r/ast", 300, {"docs"})
    assert set(stats) == {"held out", "out of domain"}
    held = stats["held out"]
    assert held["/r/ast"]["log_ratio"] == 0.0
    assert held["/r/ast_b"]["log_ratio_ci"] == pytest.approx([0.05, 0.05])
    lo, hi = held["/r/naive"]["log_ratio_ci"]
    assert lo < held["/r/naive"]["log_ratio"] < hi and hi - lo > 0.02  # independent noise: a real interval
    assert held["/r/naive"]["ppl"] == pytest.approx(np.exp(np.mean(a["scored"]["/r/naive"]["nll"]["book"]) / 32))
    assert stats["out of domain"]["/r/naive"]["ppl"] == pytest.approx(
        np.exp(np.mean(a["scored"]["/r/naive"]["nll"]["docs"]) / 32))
    t = bench.pairs_table(stats, labels, "/r/ast")
    assert f"| /R/NAIVE ({os.path.relpath('/r/naive')}) | " in t and t.count("\n") == 1 + len(nll)


def test_caches_of_other_windows_are_refused(bench):
    rng = np.random.default_rng(1)
    dense = {d: ((2.0 + rng.normal(0, 0.3, 40)) * 32).tolist() for d in ("book", "docs")}
    a = _cache(rng, {"/r/ast": 2.5}, dense, 3.0)
    other = {d: (np.asarray(v) + 5.0).tolist() for d, v in dense.items()}
    with pytest.raises(SystemExit, match="dense model's NLLs on domain .* differ"):
        bench.pairs_merge({"vm": a, "vm-b": _cache(rng, {}, other, 3.0)})
    with pytest.raises(SystemExit, match="another model, seq_len or window count"):
        bench.pairs_merge({"vm": a, "vm-b": _cache(rng, {}, dense, 3.0, windows=32)})
