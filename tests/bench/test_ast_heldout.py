"""bench/ast_heldout.py's windows and paired statistics (the scoring of real runs is the bench's, not a test's)."""
import json
import math

import numpy as np
import pytest

from data_tools.preprocess import preprocess
from megatron_ast.eval.perplexity import token_windows
from tests.conftest import stdlib_texts, write_jsonl

from tests.bench.scripts import load


@pytest.fixture(scope="module")
def bench():
    return load("ast_heldout")


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
    t = bench.table(results)
    assert "| AST | 5e-05 | 16,384 | 29.00 | 55.0% (45.0, 65.0) | -3.0% (-3.9%, -2.0%) |" in t
    assert "| dense (target) | - | - | 20.00 |" in t
    bench.plot(results, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 5000
    # text no run trained on: its own columns and markers
    results["ood_stats"] = {k: {**v, "ppl": v["ppl"] + 1, "log_ratio": 2 * v["log_ratio"],
                                    "log_ratio_ci": [2 * c for c in v["log_ratio_ci"]]} for k, v in stats.items()}
    t = bench.table(results)
    assert "| AST | 5e-05 | 16,384 | 29.00 | 55.0% (45.0, 65.0) | -3.0% (-3.9%, -2.0%) | 30.00 | -5.8% (-7.7%, -3.9%) |" in t
    assert t.splitlines()[1].count("|") == t.splitlines()[0].count("|") == 9
    bench.plot(results, tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > (tmp_path / "p.png").stat().st_size
    results["target_gaps"] = {"a": {k: {"gap_closed": 0.25, "gap_closed_ci": [0.2, 0.3]} for k in stats}}
    t = bench.table(results).splitlines()
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
