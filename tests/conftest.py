"""Shared fixtures: real tokenizers trained on real text in the test, jsonl writers, the reference assets."""
from __future__ import annotations

import json
import subprocess
import sysconfig
from pathlib import Path

import pytest


def stdlib_texts(n: int = 60) -> list[str]:
    """Real text nobody here wrote: the first `n` stdlib modules' sources."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.glob("*.py"))[:n]
    return [f.read_text(encoding="utf-8") for f in files]


def write_jsonl(path: Path, texts: list[str], extra_lines: dict[int, bytes] | None = None) -> Path:
    """One {"text", "meta"} object a line; `extra_lines` inserts raw (possibly bad) lines at positions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": t, "meta": {"i": i}}).encode() for i, t in enumerate(texts)]
    for pos, raw in sorted((extra_lines or {}).items(), reverse=True):
        lines.insert(pos, raw)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory) -> Path:
    """A real byte-level BPE fast tokenizer, trained here on stdlib sources, saved as an HF dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(stdlib_texts(), trainer)
    d = tmp_path_factory.mktemp("hf_tok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": "<pad>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    return d


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> Path:
    """A real SentencePiece model trained here on stdlib sources."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    text = d / "train.txt"
    text.write_text("\n".join(line for t in stdlib_texts(30) for line in t.splitlines() if line.strip()))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(d / "sp"), vocab_size=300,
                                   model_type="bpe", minloglevel=2)
    return d / "sp.model"


@pytest.fixture(scope="session")
def reference_assets() -> dict:
    from megatron_ast.assets import ensure_assets

    return ensure_assets()


@pytest.fixture()
def small_disk(tmp_path):
    """mount(nbytes) -> an empty dir on a tmpfs of that size, unmounted at the end: a real full disk (ENOSPC from
    every writer, Python's, torch's and safetensors' Rust one). Skips where this process may not mount; then
    the injected-writer test (tests/export/test_hf.py) still runs."""
    mounted = []

    def mount(nbytes: int, name: str = "disk") -> Path:
        d = tmp_path / name
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(nbytes)}", "tmpfs", str(d)], capture_output=True,
                           text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): needs root")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def assert_full_disk_line(err: str, where: Path) -> None:
    """The CLI's one line for a full disk, naming the output, and nothing left in `where`."""
    lines = err.strip().splitlines()
    assert lines and "no space left on the device of" in lines[-1] and "free" in lines[-1], err[-2000:]
    assert not any(line.startswith("Traceback") for line in lines), err[-2000:]
    assert not any(where.iterdir()), list(where.iterdir())
