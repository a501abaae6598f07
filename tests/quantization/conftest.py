"""The quantize tests reuse the pruning tests' tiny models."""
from tests.pruning.conftest import calib, tiny  # noqa: F401
