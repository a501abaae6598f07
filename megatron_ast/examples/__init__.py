"""Files that ship with the package: DeepSpeed configs (`ds_configs/`) and launcher scripts with an example
run.yaml (`launch/`). A checkout links them at its top level; an installed wheel has them here, and
`megatron-ast init` copies them beside the run.yaml it writes."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def example(name: str) -> Path:
    """The shipped file `name` (e.g. "ds_configs/zero3_bf16.json", "launch/train_slurm.sbatch")."""
    path = ROOT / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not shipped with this install of megatron-ast (reinstall it)")
    return path
