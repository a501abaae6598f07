"""The launcher tests reuse the training runs' fixture (a tiny Llama and real text in token shards)."""
from tests.training.conftest import run_dir  # noqa: F401
