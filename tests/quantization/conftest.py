"""The quantize tests reuse the pruning tests' tiny models and model dir."""
from tests.pruning.conftest import calib, calib_file, model_dir, tiny  # noqa: F401
