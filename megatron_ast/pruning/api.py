"""`prune`: model dir in, pruned model dir out (safetensors + masks + sparsity_report.json)."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from megatron_ast.errors import UsageError
from megatron_ast.fsutil import atomic_dir
from megatron_ast.modeling import check_model_dir
from megatron_ast.pruning.calibration import calibration_samples
from megatron_ast.pruning.pipeline import PruneConfig, model_dtype, prune_model, summary, validate_shapes
from megatron_ast.pruning.streamed import StreamedModel
from megatron_ast.sparsity import slorb_adapter
from megatron_ast.sparsity.slorb import group_projection
from megatron_ast.sparsity.sparse_weights import MASK_LAYOUT

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")
MASKS_FILE = "masks.safetensors"
REPORT_FILE = "sparsity_report.json"


def prune_to_dir(
    model_dir: str | Path,
    out_dir: str | Path,
    cfg: PruneConfig,
    calib: list[str] | None = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    tokenizer: str | Path | None = None,
    text_key: str = "text",
) -> dict:
    """Prune `model_dir` and write the result to `out_dir` (created atomically; must not exist)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise UsageError(f"{out_dir} already exists: pass a new --out")
    check_model_dir(model_dir)
    t0 = time.perf_counter()
    samples = None
    if cfg.method != "magnitude":  # cheap checks first: no model load before the data is known good
        if not calib:
            raise UsageError(f"--method {cfg.method} needs calibration data: pass --calib SHARD_DIRS_OR_FILES")
        samples = calibration_samples(calib, tokenizer or model_dir, nsamples, seqlen, seed, text_key)
    branches = {}
    with atomic_dir(out_dir) as tmp:  # the layers' files go inside: a failure leaves nothing behind
        streamed = StreamedModel(model_dir, tmp / ".layers", cfg.device)
        if slorb_adapter.adapter_dir(model_dir) is not None:
            print(f"[prune] {slorb_adapter.adapter_dir(model_dir)} not used: the base is pruned", file=sys.stderr)
        validate_shapes(streamed.model, cfg.pattern, cfg.slorb_group, cfg.ignore)
        masks, rows = prune_model(streamed.model, cfg, samples, branches, layers_io=streamed)
        report = {
            "method": cfg.method, "pattern": str(cfg.pattern), "sparsity_target": cfg.pattern.sparsity,
            "source_model": str(model_dir),
            "calibration": None if samples is None else {"data": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed},
            "ignore": list(cfg.ignore),
            "experts": {"calibration": cfg.expert_calibration, "min_tokens": cfg.expert_min_tokens}
            if any(r.get("experts") for r in rows) else None,
            "linears": len(rows),
            "all_valid": all(r["pattern_valid"] for r in rows),
            "sparsity": sum(r["sparsity"] * r["elements"] for r in rows) / sum(r["elements"] for r in rows),
            "by_kind": summary(rows),
            "seconds": round(time.perf_counter() - t0, 1),
            "layers": rows,
        }
        errors = [r["reconstruction_error"] for r in rows if r["reconstruction_error"] is not None]
        report["mean_reconstruction_error"] = sum(errors) / len(errors) if errors else None
        if branches:
            ratios = sorted(r["slorb_residual_ratio"] for r in rows if "slorb_residual_ratio" in r)
            report["slorb"] = {"group": cfg.slorb_group, "init": "fitted", "adapter": slorb_adapter.ADAPTER_DIR,
                               "branches": len(branches), "parameters": sum(s.numel() for s in branches.values()),
                               "median_residual_ratio": ratios[len(ratios) // 2]}
        streamed.save(tmp, masks, MASKS_FILE, {"pattern": str(cfg.pattern), "method": cfg.method,
                                                "mask_layout": MASK_LAYOUT})
        shutil.rmtree(tmp / ".layers")
        for name in TOKENIZER_FILES:
            if (Path(model_dir) / name).is_file():
                shutil.copy2(Path(model_dir) / name, tmp / name)
        if branches:  # base + adapter, as an AST export: every loader measures the two together
            dtype = model_dtype(streamed.model)
            slorb_adapter.save(tmp / slorb_adapter.ADAPTER_DIR, {name: (group_projection(b.shape[1] * cfg.slorb_group,
                               cfg.slorb_group), b) for name, b in branches.items()}, dtype, out_dir)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    kinds = ", ".join(f"{c['matrices']} {kind}" for kind, c in report["by_kind"].items())
    print(f"pruned {len(rows)} weights ({kinds}) to {cfg.pattern} with {cfg.method}: sparsity {report['sparsity']:.4f}, "
          f"all valid: {report['all_valid']} -> {out_dir}", file=sys.stderr)
    return report
