"""megatron_ast: dense LLM -> 2:4 semi-structured sparse LLM (AST, one-shot pruners, data tools)."""

__version__ = "0.1.0"
