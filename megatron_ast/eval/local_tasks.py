"""Offline lm-eval tasks, in lm-eval's own YAML task format, built from the held-out reference corpus.

Hub datasets cannot be fetched here, so `build_local_tasks` writes two tasks
from real held-out text (the validation split of DESIGN.md §7's corpus, which
no training or pruning run sees), each a jsonl file beside a YAML file that
lm-eval loads through its `include_path`:

- `shakespeare_cloze` (loglikelihood, LAMBADA-style): the last 256 characters of
  a held-out play before a verse line's last word; the target is that word.
  Metrics: acc (the word is the greedy continuation) and perplexity.
- `code_next_line` (multiple_choice): eight lines of held-out standard-library
  code, then the true next line among four candidates (three drawn from other
  held-out files, with the same indentation). Metrics: acc, acc_norm.

The documents are sampled with a fixed seed, so a task's contents depend only
on the corpus, `n` and `seed`, which are recorded in the YAML's metadata.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import yaml

from megatron_ast.fsutil import atomic_dir

TASKS = ("shakespeare_cloze", "code_next_line")
GROUP = "megatron_ast_local"
_WORD = re.compile(r"([A-Za-z][a-z']{3,})[,.;:!?]?\s*$")
_CONTEXT_CHARS, _CODE_LINES, _CHOICES = 256, 8, 4


def _docs(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _cloze(texts: list[str], n: int, rng: random.Random) -> list[dict]:
    """(context, word) pairs: a verse line's last word after the text before it."""
    candidates = []
    for t in texts:
        pos = 0
        for line in t.splitlines(keepends=True):
            m = _WORD.search(line.rstrip("\n").rstrip())
            if m and not line.lstrip().startswith(("**", "_", "#")) and pos + m.start(1) >= _CONTEXT_CHARS:
                start = pos + m.start(1)
                candidates.append((t[start - _CONTEXT_CHARS : start].rstrip(" "), m.group(1)))
            pos += len(line)
    picked = rng.sample(candidates, min(n, len(candidates)))
    return [{"context": c, "word": w} for c, w in picked]


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _next_line(texts: list[str], n: int, rng: random.Random) -> list[dict]:
    """Eight lines of code, the true next line and three same-indentation lines from other files."""
    files = [[ln for ln in t.splitlines() if ln.strip()] for t in texts]
    files = [f for f in files if len(f) > _CODE_LINES + 1]
    by_indent: dict[str, list[tuple[int, str]]] = {}
    for i, lines in enumerate(files):
        for ln in lines:
            by_indent.setdefault(_indent(ln), []).append((i, ln))
    out = []
    for _ in range(50 * n):
        if len(out) == n:
            break
        i = rng.randrange(len(files))
        k = rng.randrange(_CODE_LINES, len(files[i]))
        true = files[i][k]
        pool = [ln for j, ln in by_indent.get(_indent(true), []) if j != i and ln != true]
        distractors = list(dict.fromkeys(rng.sample(pool, min(len(pool), 3 * _CHOICES))))[: _CHOICES - 1]
        if len(distractors) < _CHOICES - 1 or len(set(distractors + [true])) < _CHOICES:
            continue
        choices = distractors + [true]
        rng.shuffle(choices)
        out.append({"context": "\n".join(files[i][k - _CODE_LINES : k]) + "\n", "choices": choices,
                    "label": choices.index(true)})
    return out


def _yaml(task: str, data: Path, n: int, seed: int) -> dict:
    common = {"task": task, "tag": [GROUP], "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", "metadata": {"version": 1.0, "n": n, "seed": seed, "source": "megatron_ast held-out corpus"}}
    if task == "shakespeare_cloze":
        return {**common, "output_type": "loglikelihood", "doc_to_text": "{{context}}", "doc_to_target": " {{word}}",
                "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    return {**common, "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}


def build_local_tasks(out: str | Path, book_jsonl: str | Path, code_jsonl: str | Path, n: int = 200,
                      seed: int = 1234) -> Path:
    """Write both tasks (jsonl + YAML) into `out` atomically, once (an existing `out` is reused); returns `out`."""
    out = Path(out)
    if out.is_dir():
        return out
    rows = {"shakespeare_cloze": _cloze(_docs(Path(book_jsonl)), n, random.Random(seed)),
            "code_next_line": _next_line(_docs(Path(code_jsonl)), n, random.Random(seed + 1))}
    with atomic_dir(out) as tmp:
        for task, docs in rows.items():
            if not docs:
                raise ValueError(f"{task}: no examples could be built from the corpus")
            (tmp / f"{task}.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
            (tmp / f"{task}.yaml").write_text(yaml.safe_dump(_yaml(task, out.resolve() / f"{task}.jsonl", len(docs), seed),
                                                             sort_keys=False))
    return out
