"""The sparsity core: patterns, masks from scores, scores, and the N:M validator."""
from megatron_ast.sparsity.masks import mask_from_score, nm_mask, unstructured_mask
from megatron_ast.sparsity.pattern import SparsityPattern
from megatron_ast.sparsity.scores import magnitude_score, wanda_score
from megatron_ast.sparsity.validate import nm_violations, sparsity_of

__all__ = [
    "SparsityPattern", "mask_from_score", "nm_mask", "unstructured_mask",
    "magnitude_score", "wanda_score", "nm_violations", "sparsity_of",
]
