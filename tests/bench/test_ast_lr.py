"""bench/ast_lr.py: which results files make one lr sweep, and the best lr per method."""
import json
from pathlib import Path

import pytest

from tests.bench.scripts import load


@pytest.fixture(scope="module")
def bench():
    return load("ast_lr")


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
    c = bench.collect(tmp_path, "vm")
    assert set(c["points"]) == {"ast", "naive"}  # the ablation measured at one lr only is not a sweep row
    assert c["points"]["naive"][1e-4][1] == 33.0 and bench.best_lr(c["points"]["naive"]) == 3e-4
    assert bench.best_lr(c["points"]["ast"]) == 1e-4 and c["tokens"] == 16 * 1024
    assert "| AST | 30.00 (50.0%) | 46.00 (50.0%) |" in bench.table(c)
    c48 = bench.collect(tmp_path, "vm-s48")
    assert c48["points"] == {"ast": {5e-5: ("AST", 25.0, 0.5)}} and c48["curves"]["ast"][5e-5][-1] == (48 * 1024, 25.0)
    bench.plot(c, tmp_path / "lr.png", tmp_path / "best.png")
    assert (tmp_path / "best.png").stat().st_size > 5000
    _write(tmp_path, "vm-lr6e-4", 32, 6e-4, {"ast": 30.0})
    with pytest.raises(SystemExit, match="other steps"):
        bench.collect(tmp_path, "vm")
    with pytest.raises(SystemExit, match="no bench/results"):
        bench.collect(tmp_path, "h100")
