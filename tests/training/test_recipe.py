"""`megatron-ast init`: a run dir whose batch arithmetic is right for its world, accepted by the dry run."""
import json

import pytest
import yaml

from megatron_ast.cli import main
from megatron_ast.training.recipe import batch
from tests.pruning.conftest import calib_file, model_dir, tiny  # noqa: F401


@pytest.fixture()
def pruned(tmp_path, model_dir, calib_file):  # noqa: F811
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--method", "sparsegpt", "--calib", str(calib_file), "--nsamples",
                 "4", "--seqlen", "32", "--slorb-group", "16", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (8, 8)])
def test_init_writes_what_the_dry_run_accepts_for_1_8_and_64_gpus(model_dir, pruned, tmp_path, gpus, nodes, capsys):
    out = tmp_path / f"run{gpus}x{nodes}"
    assert main(["init", "--model", str(model_dir), "--pruned", str(pruned), "--out", str(out), "--gpus-per-node",
                 str(gpus), "--nodes", str(nodes), "--tokens", "1e9"]) == 0
    made = json.loads(capsys.readouterr().out)["init"]
    world = gpus * nodes
    assert made["world_size"] == world and made["global_batch"] == made["micro"] * made["grad_accum"] * world
    assert made["tokens_per_step"] == made["global_batch"] * 1024 == 2**19  # 8 x 1024 per GPU, accumulated to 2^19
    assert made["steps"] * made["tokens_per_step"] >= 1e9 > (made["steps"] - 1) * made["tokens_per_step"]
    cfg = yaml.safe_load((out / "run.yaml").read_text())
    assert cfg["slorb"] == {"group": 16, "init": "fitted", "trainable_projection": False} and cfg["steps"] == made["steps"]
    assert {"train_slurm.sbatch", "train_deepspeed.sh", "ds_config.json"} <= {p.name for p in out.iterdir()}
    assert main(["train", "--config", str(out / "run.yaml"), "--dry-run", "--world-size", str(world), "--nodes",
                 str(nodes)]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["batch"]["global_batch"] == made["global_batch"] and dry["batch"]["tokens_per_step"] == 2**19


def test_init_refuses_a_dir_that_is_not_a_prune(model_dir, tmp_path, capsys):  # noqa: F811
    assert main(["init", "--model", str(model_dir), "--pruned", str(model_dir), "--out", str(tmp_path / "r")]) == 2
    assert "megatron-ast prune" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_batch_rounds_the_accumulation_to_the_nearest_whole_step():
    assert batch(64, 4096, 2**19, 10**9) == {"micro": 2, "grad_accum": 1, "global_batch": 128, "tokens_per_step": 2**19,
                                             "steps": 1908}
    b = batch(24, 1024, 2**19, 10**6)
    assert b["grad_accum"] == 3 and b["tokens_per_step"] == 8 * 1024 * 24 * 3 and b["steps"] == 2
