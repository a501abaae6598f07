"""The export tests reuse the training runs' fixture (a tiny Llama and real text in token shards)."""
import pytest

from tests.training.conftest import config_file, run_dir, train  # noqa: F401


@pytest.fixture(scope="module")
def trained(run_dir):  # noqa: F811
    """A complete checkpoint of a 3-step AST run with SLoRB (masks recomputed at step 2)."""
    out = run_dir / "export_run"
    train(config_file(run_dir, output_dir=str(out), steps=3, mask_interval=2, srste={"lam": 2e-4, "t_inc": 2},
                      eval={"every": 0, "windows": 2}))
    return out / "checkpoints" / "step3"


@pytest.fixture(scope="module")
def trained_projection(run_dir):  # noqa: F811
    """The same with SLoRB's projection trainable (so the adapter's A is no longer the plain group sum)."""
    out = run_dir / "export_run_projection"
    train(config_file(run_dir, output_dir=str(out), steps=3, mask_interval=2, srste={"lam": 2e-4, "t_inc": 2},
                      slorb={"group": 16, "trainable_projection": True}, eval={"every": 0, "windows": 2}))
    return out / "checkpoints" / "step3"
