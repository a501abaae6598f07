"""What megatron_ast reads of DeepSpeed's ZeRO-3 internals is checked when it starts, not trusted: each
assumption broken on purpose on a real engine gives a one-line error naming it (exit 2 through the CLI)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.training.conftest import REPO, TRAIN_ENV, free_port

CASES = {
    "none": None,
    "plain_adamw": "ZeRO-3 steps AdamW, not the SR-STE AdamW it was given",
    "offsets": "the partitions of sub-group 0 add up to",
    "master_is_working": "sub-group 0's fp32 master and its working partition are one tensor",
    "working_offset": "working partition is not at offset",
    "partial_offload": "offload_optimizer.ratio 0.5: AST offloads all of the optimizer or none",
    "not_stepped": "the optimizer step did not get 1 of the 1 tensors that hold masked weights",
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("assumptions")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(d / "model")
    procs = []
    for case in CASES:  # a process each (a second engine in one process is not built the same way), two at a time
        env = {**TRAIN_ENV, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port())}
        with open(d / f"{case}.out", "w") as out, open(d / f"{case}.err", "w") as err:
            procs.append((case, subprocess.Popen([sys.executable, str(Path(__file__).with_name("assumptions_worker.py")),
                                                  str(d / "model"), case], stdout=out, stderr=err, env=env, cwd=REPO)))
        if len(procs) >= 2:
            procs[-2][1].wait(timeout=600)
    found = {}
    for case, proc in procs:
        assert proc.wait(timeout=600) == 0, (d / f"{case}.err").read_text()[-3000:]
        stdout = (d / f"{case}.out").read_text()
        found.update(json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:]))
    return found


@pytest.mark.parametrize("case", CASES)
def test_a_broken_assumption_is_a_one_line_error_naming_it(results, case):
    if CASES[case] is None:
        assert results[case] is None  # the real engine, unbroken, passes every check and steps
        return
    assert results[case] is not None and CASES[case] in results[case], results[case]
    assert "\n" not in results[case]
    if case != "partial_offload":
        assert results[case].startswith(f"DeepSpeed {__import__('deepspeed').__version__}: ")
        assert "tested with deepspeed" in results[case] and ">=0.19.8" in results[case]
