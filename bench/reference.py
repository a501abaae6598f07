"""The reference model and corpus for the benches: assets (built once) and their token shards."""
from __future__ import annotations

from pathlib import Path


def reference_shards(work: Path, splits: tuple[str, ...] = ("train", "validation")) -> tuple[dict, dict[str, Path]]:
    """(assets, {split: shard dir under work/shards}); tokenizing is skipped for shards already complete."""
    from data_tools.preprocess import preprocess
    from megatron_ast.assets import DOMAINS, ensure_assets

    a = ensure_assets()
    dirs = {split: Path(work) / "shards" / split for split in splits}
    for split, d in dirs.items():
        preprocess([a["corpus"][dom][split] for dom in DOMAINS], d, a["tokenizer"], workers=2)
    return a, dirs
