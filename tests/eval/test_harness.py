"""lm-eval as a library on our offline local tasks, built from the held-out reference corpus."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_ast.cli import main
from megatron_ast.eval.local_tasks import build_local_tasks
from tests.pruning.conftest import model_dir, tiny  # noqa: F401

pytestmark = pytest.mark.assets


@pytest.fixture(scope="module")
def tasks_dir(reference_assets, tmp_path_factory):
    c = reference_assets["corpus"]
    return build_local_tasks(tmp_path_factory.mktemp("tasks") / "t", c["book"]["validation"], c["github"]["validation"], 12)


def _rows(tasks_dir, task):
    return [json.loads(line) for line in (tasks_dir / f"{task}.jsonl").read_text().splitlines()]


def test_local_tasks_come_from_held_out_text_and_are_deterministic(reference_assets, tasks_dir, tmp_path):
    c = reference_assets["corpus"]
    book = (tmp_path / "book.txt")
    book.write_text("".join(json.loads(line)["text"] for line in open(c["book"]["validation"], encoding="utf-8")))
    held_out = book.read_text()
    cloze = _rows(tasks_dir, "shakespeare_cloze")
    assert len(cloze) == 12 and all(r["context"] + " " + r["word"] in held_out or r["context"] + r["word"] in held_out
                                    for r in cloze)
    code = _rows(tasks_dir, "code_next_line")
    assert len(code) == 12 and all(len(set(r["choices"])) == 4 and 0 <= r["label"] < 4 for r in code)
    again = build_local_tasks(tmp_path / "again", c["book"]["validation"], c["github"]["validation"], 12)
    for t in ("shakespeare_cloze", "code_next_line"):
        assert (again / f"{t}.jsonl").read_bytes() == (tasks_dir / f"{t}.jsonl").read_bytes()


def _direct_mc_accuracy(model_dir, rows) -> float:
    """lm-eval's multiple-choice acc computed here: argmax of the summed log-probs of each choice's tokens
    (the tokens of context+choice after those of the context, trailing whitespace moved to the choice)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    right = 0
    for r in rows:
        ctx = tok(r["context"].rstrip())["input_ids"]
        scores = []
        for choice in r["choices"]:
            ids = tok(r["context"] + choice)["input_ids"]
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            scores.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(ctx), len(ids))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == r["label"])
    return right / len(rows)


@pytest.fixture()
def pruned_dir(model_dir, tmp_path):
    """The tiny model with magnitude 2:4 masks applied to its decoder Linears."""
    from megatron_ast.sparsity import nm_mask
    from megatron_ast.sparsity.sparse_weights import sparse_weights

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for w in (model.get_parameter(sw.name) for sw in sparse_weights(model)):
            w.mul_(nm_mask(w.abs(), 2, 4))
    d = tmp_path / "pruned"
    model.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((model_dir / f).read_bytes())
    return d


@pytest.mark.slow
def test_lm_eval_runs_local_tasks_on_two_models_side_by_side(model_dir, pruned_dir, capsys):
    from megatron_ast.assets import cache_root

    models = [str(model_dir), str(pruned_dir)]
    assert main(["eval", "lm-eval", "--model", *models, "--n", "12", "--batch-size", "4"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    for m in models:
        res = out["results"][m]
        assert set(res) == {"shakespeare_cloze", "code_next_line"}
        assert 0 <= res["code_next_line"]["acc"] <= 1 and res["shakespeare_cloze"]["perplexity"] > 1
    assert out["results"][models[0]] != out["results"][models[1]]
    assert "dense" in captured.err and "pruned" in captured.err  # the side-by-side table
    rows = _rows(cache_root() / "lm_eval_tasks" / "n12", "code_next_line")
    for m in models:
        assert out["results"][m]["code_next_line"]["acc"] == pytest.approx(_direct_mc_accuracy(m, rows))


def test_offline_standard_task_and_dense_model_with_expect_are_refused(model_dir, capsys):
    assert main(["eval", "lm-eval", "--model", str(model_dir), "--tasks", "hellaswag"]) == 2
    assert "needs the Hugging Face hub" in capsys.readouterr().err
    assert main(["eval", "lm-eval", "--model", str(model_dir), "--expect", "2:4"]) == 2
    assert "is not 2:4" in capsys.readouterr().err
