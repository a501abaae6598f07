"""Model dirs that are damaged give our one line (exit 2) before any library reads them."""
import pytest

from megatron_ast.cli import main
from tests.pruning.conftest import calib_file, model_dir, tiny  # noqa: F401


def _damage(model_dir, what: str) -> None:
    if what == "safetensors cut short":
        f = model_dir / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size * 2 // 3])
    elif what == "safetensors header only":
        f = model_dir / "model.safetensors"
        f.write_bytes(f.read_bytes()[:6])
    elif what == "config.json malformed":
        f = model_dir / "config.json"
        f.write_text(f.read_text()[:-40])


@pytest.mark.parametrize("what", ["safetensors cut short", "safetensors header only", "config.json malformed"])
@pytest.mark.parametrize("command", ["prune", "eval ppl"])
def test_a_damaged_model_dir_is_one_line_exit_2(model_dir, calib_file, tmp_path, command, what, capsys):
    """Before: safetensors' `SafetensorError: Error while deserializing header` traceback (prune, eval ppl), and a
    41-line traceback from transformers for a malformed config.json; exit 1 each."""
    _damage(model_dir, what)
    args = (["prune", "--model", str(model_dir), "--method", "magnitude", "--out", str(tmp_path / "out")]
            if command == "prune" else ["eval", "ppl", "--model", str(model_dir), "--data", str(calib_file)])
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    name = "config.json" if "config" in what else "model.safetensors"
    assert len(err) == 1 and name in err[0] and ("cut short" in err[0] or "not valid JSON" in err[0]), err
    assert not (tmp_path / "out").exists()
