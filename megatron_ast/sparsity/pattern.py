"""A sparsity pattern: N:M semi-structured (keep N of every M consecutive inputs) or unstructured."""
from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_ast.errors import UsageError


@dataclass(frozen=True)
class SparsityPattern:
    n: int = 2  # kept per group (N:M only)
    m: int = 4  # group size (N:M only); 0 means unstructured
    sparsity: float = 0.5  # fraction of zeros; for N:M it is 1 - n/m

    @property
    def structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"unstructured {self.sparsity:g}"

    @staticmethod
    def parse(text: str, sparsity: float | None = None) -> "SparsityPattern":
        """'2:4', '4:8', ... or 'unstructured' (with `sparsity`, default 0.5)."""
        if text == "unstructured":
            s = 0.5 if sparsity is None else sparsity
            if not 0.0 < s < 1.0:
                raise UsageError(f"--sparsity must be strictly between 0 and 1, got {s}")
            return SparsityPattern(0, 0, float(s))
        match = re.fullmatch(r"(\d+):(\d+)", text)
        if not match:
            raise UsageError(f"pattern {text!r} is neither N:M (e.g. 2:4) nor 'unstructured'")
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise UsageError(f"pattern {text!r} needs 0 < N < M (keep N of every M weights), e.g. 2:4 or 4:8")
        if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-9:
            raise UsageError(f"--sparsity {sparsity} contradicts pattern {text} (which is {1 - n / m:g}); drop --sparsity")
        return SparsityPattern(n, m, 1 - n / m)

    def check_shape(self, in_features: int, where: str) -> None:
        if self.structured and in_features % self.m:
            raise UsageError(
                f"{where}: in_features {in_features} is not a multiple of M={self.m}, so {self} cannot apply; "
                "exclude this layer or pick another M"
            )
