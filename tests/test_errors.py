"""The one-line error as torchrun reports it: torchrun exits 1 whatever a rank's exit code, and its failure summary
shows what the rank wrote to its error file."""
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from megatron_ast.cli import main


def test_under_torchrun_the_failure_summary_names_the_one_line(tmp_path, monkeypatch, capsys):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert main(["inspect", str(tmp_path / "no-such-shards")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("megatron-ast: error: ") and "no-such-shards" in line
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file))
    summary = str(ChildFailedError("megatron-ast", {0: failure}))
    assert f"traceback : {line}" in summary and "To enable traceback" not in summary


def test_without_torchrun_no_error_file_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", str(tmp_path / "no-such-shards")]) == 2
    assert capsys.readouterr().err.count("megatron-ast: error: ") == 1 and list(tmp_path.iterdir()) == []
