"""Writers leave nothing behind when they fail: not the output, nor the dirs made for it."""
import pytest

from megatron_ast.fsutil import atomic_dir, new_dirs


def test_a_failed_atomic_dir_removes_the_parents_it_made_and_keeps_the_others(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "kept" / "a" / "b" / "out") as scratch:
            (scratch / "model.safetensors").write_bytes(b"x")
            raise RuntimeError("the disk filled")
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"] and not any((tmp_path / "kept").iterdir())
    with atomic_dir(tmp_path / "kept" / "a" / "out") as scratch:
        (scratch / "f").write_text("y")
    assert (tmp_path / "kept" / "a" / "out" / "f").read_text() == "y"


def test_new_dirs_leaves_a_dir_that_something_else_filled(tmp_path):
    with pytest.raises(ValueError):
        with new_dirs(tmp_path / "x" / "shards") as d:
            (d / "rank1.bin").write_bytes(b"")  # another rank's finished output
            raise ValueError
    assert (tmp_path / "x" / "shards" / "rank1.bin").is_file()
    with pytest.raises(ValueError):
        with new_dirs(tmp_path / "y" / "shards"):
            raise ValueError
    assert not (tmp_path / "y").exists()


def test_make_dirs_names_only_what_it_made_and_refuses_a_file_on_the_way(tmp_path):
    from megatron_ast.errors import UsageError
    from megatron_ast.fsutil import make_dirs, remove_empty

    (tmp_path / "t").mkdir()
    (tmp_path / "t2").mkdir()  # existing and empty: `new/../../t2` must not count it as made
    made = make_dirs(tmp_path / "t" / "new" / ".." / ".." / "t2" / "x")
    assert made == [tmp_path.resolve() / "t2" / "x"]
    remove_empty(made)
    assert (tmp_path / "t2").is_dir() and not (tmp_path / "t2" / "x").exists()
    (tmp_path / "f").write_text("")
    with pytest.raises(UsageError, match="is a file, not a directory"):
        make_dirs(tmp_path / "f" / "x")
