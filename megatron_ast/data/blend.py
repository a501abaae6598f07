"""Blend specs: domain -> weight, from a small JSON/YAML file or RedPajama's default mix."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_ast.errors import UsageError
from megatron_ast.fsutil import read_config_file

# LLaMA's RedPajama-v1 mix, keyed by RedPajama-1T's directory names.
REDPAJAMA_WEIGHTS = {
    "common_crawl": 67.0, "c4": 15.0, "github": 4.5, "book": 4.5,
    "arxiv": 2.5, "wikipedia": 4.5, "stackexchange": 2.0,
}


@dataclass(frozen=True)
class BlendSpec:
    weights: dict[str, float]

    @staticmethod
    def load(path: str | Path) -> "BlendSpec":
        """`{"weights": {"book": 1, "github": 2}}` (or the mapping alone), as .json or .yaml."""
        p = Path(path)
        raw = read_config_file(p, "blend spec")
        weights = raw.get("weights", raw) if isinstance(raw, dict) else None
        if not isinstance(weights, dict) or not weights:
            raise UsageError(f"blend spec {p} must map domain names to weights, e.g. {{\"weights\": {{\"book\": 1}}}}")
        return BlendSpec.of(weights, where=str(p))

    @staticmethod
    def of(weights: dict, where: str = "blend") -> "BlendSpec":
        for d, w in weights.items():
            if not isinstance(w, (int, float)) or w < 0:
                raise UsageError(f"{where}: weight of domain {d!r} must be a number >= 0, got {w!r}")
        if sum(weights.values()) <= 0:
            raise UsageError(f"{where}: weights sum to zero")
        return BlendSpec({str(d): float(w) for d, w in weights.items()})

    def resolve(self, present: list[str]) -> dict[str, float]:
        """Normalised weights over the domains that have shards; unknown domains are an error."""
        unknown = sorted(set(self.weights) - set(present))
        if unknown:
            raise UsageError(f"unknown blend domain(s) {unknown}: the shards hold {sorted(present)}")
        kept = {d: w for d, w in sorted(self.weights.items()) if w > 0}
        total = sum(kept.values())
        return {d: w / total for d, w in kept.items()}


def default_blend(present: list[str]) -> BlendSpec:
    missing = sorted(set(present) - set(REDPAJAMA_WEIGHTS))
    if missing:
        raise UsageError(f"domain(s) {missing} have no default RedPajama weight: pass a blend spec with their weights")
    return BlendSpec({d: REDPAJAMA_WEIGHTS[d] for d in present})
