"""`megatron-ast eval lm-eval`: EleutherAI's LM Evaluation Harness as a library, offline by default.

Each model dir is loaded as every other measurement loads it (modeling.load_causal_lm:
`AutoModelForCausalLM` from the dir, with its SLoRB adapter when it has one unless
`adapter=False`) and handed to lm-eval's own HF model class, so an exported or
pruned 2:4 model is evaluated with its sparse weights as stored, plus its branch. Our local tasks (eval/local_tasks.py) run with no network;
a standard task name (hellaswag, piqa, ...) needs its dataset from the Hugging
Face hub and is passed through only with `allow_hub=True`.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from megatron_ast.errors import UsageError
from megatron_ast.eval.local_tasks import TASKS
from megatron_ast.modeling import check_model_dir, load_causal_lm

METRICS = ("acc", "acc_norm", "perplexity")


def _task_manager(tasks_dir: Path | None):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UsageError("lm-eval is not installed: pip install 'megatron-ast[eval]'") from None
    return TaskManager(include_path=str(tasks_dir) if tasks_dir else None)


def check_tasks(tasks: list[str], allow_hub: bool) -> None:
    for t in tasks:
        if t not in TASKS and not allow_hub:
            raise UsageError(f"task {t!r} is not a local task ({', '.join(TASKS)}): its dataset needs the Hugging Face "
                             "hub; pass --allow-hub on a machine that can reach it")


def evaluate(models: list[str | Path], tasks: list[str], tasks_dir: Path | None, allow_hub: bool = False,
             batch_size: int = 8, limit: int | None = None, device: str = "cpu", adapter: bool = True,
             dtype=None) -> dict:
    """{model dir: {task: {metric: value}}} for every model, the same tasks and documents."""
    check_tasks(tasks, allow_hub)
    for m in models:
        check_model_dir(m)
    manager = _task_manager(tasks_dir if any(t in TASKS for t in tasks) else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f"unknown lm-eval task(s) {', '.join(unknown)}: see `lm-eval ls tasks`")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if not allow_hub:
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    out = {}
    for m in models:
        print(f"[lm-eval] {m}: {', '.join(tasks)}", file=sys.stderr)
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries our JSON only
            lm = HFLM(pretrained=load_causal_lm(m, dtype, adapter=adapter).to(device), tokenizer=str(m), batch_size=batch_size,
                      device=device)
            res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, batch_size=batch_size, limit=limit,
                                          log_samples=False, bootstrap_iters=0)
        out[str(m)] = {t: {k.split(",")[0]: float(v) for k, v in r.items()
                           if k.split(",")[0] in METRICS and isinstance(v, (int, float))}
                       for t, r in res["results"].items() if t in tasks}
    return out


def table(results: dict) -> str:
    """Models side by side, one row per task and metric."""
    models = list(results)
    rows = sorted({(t, k) for r in results.values() for t, ms in r.items() for k in ms})
    head = ["task", "metric", *[Path(m).name for m in models]]
    body = [[t, k, *[f"{results[m].get(t, {}).get(k, float('nan')):.4f}" for m in models]] for t, k in rows]
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [head, *body])
