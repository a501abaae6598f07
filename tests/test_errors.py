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


def test_the_error_file_is_whole_or_absent(tmp_path, monkeypatch, capsys):
    """A cut error file makes torchrun's agent fail reading it: the file is written whole (a temp file, renamed)
    or not at all, and the line is printed either way."""
    import json

    from megatron_ast.errors import report

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    report("first")
    assert capsys.readouterr().err == "megatron-ast: error: first\n"
    assert json.loads(error_file.read_text())["message"]["message"] == "megatron-ast: error: first"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "no-such-dir" / "error.json"))
    report("second")
    assert capsys.readouterr().err == "megatron-ast: error: second\n" and sorted(tmp_path.iterdir()) == [error_file]
