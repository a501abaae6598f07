"""bench/ast_ablation.py's arithmetic, table and plots (the runs themselves are the bench's, not a test's)."""
import json
import math

import pytest
import yaml

from tests.bench.scripts import load


@pytest.fixture(scope="module")
def bench():
    return load("ast_ablation")


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
    bench.plot(results, tmp_path / "a.png", tmp_path / "f.png")
    for png in ("a.png", "f.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = bench.table(results).splitlines()
    assert len(rows) == 2 + 4 and "| AST | 48.00 | 12.00 | 24.00 | 74.0% | 0.0100 | 16,384 | 10 |" in rows
    assert rows[-1].startswith("| dense (target) | 40.00")
