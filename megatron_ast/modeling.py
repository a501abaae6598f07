"""Loading Hugging Face causal LMs from local dirs only (no hub, no remote code unless asked)."""
from __future__ import annotations

from pathlib import Path

from megatron_ast.errors import UsageError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_dir(path: str | Path) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise UsageError(f"{p} is not a Hugging Face model dir (no config.json): pass --model a local model dir")
    if not any((p / w).is_file() for w in WEIGHT_FILES):
        raise UsageError(f"{p} has a config.json but no weights ({', '.join(WEIGHT_FILES[:2])}): re-export the model")
    return p


def load_causal_lm(path: str | Path, dtype=None, trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # our own progress bars say what is going on
    p = check_model_dir(path)
    return AutoModelForCausalLM.from_pretrained(
        p, dtype=dtype or torch.float32, local_files_only=True, trust_remote_code=trust_remote_code
    )
