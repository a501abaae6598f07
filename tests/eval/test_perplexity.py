import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from data_tools.preprocess import preprocess
from megatron_ast.cli import main
from megatron_ast.eval.perplexity import perplexity, pick_windows, token_windows, window_nll
from tests.conftest import stdlib_texts, write_jsonl


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, hf_tokenizer_dir):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(d)
    for f in hf_tokenizer_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return model, d


def test_equals_hf_loss_per_window(tiny_model):
    model, _ = tiny_model
    w = {"x": np.random.default_rng(0).integers(0, 600, (3, 64))}
    r = perplexity(model, w, batch_size=2)
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor(row[None]), labels=torch.tensor(row[None])).loss.item() for row in w["x"]]
    assert r["x"]["tokens"] == 3 * 63 and r["x"]["windows"] == 3
    assert r["all"]["ppl"] == pytest.approx(math.exp(np.mean(losses)), rel=1e-5)
    per_window = window_nll(model, w, batch_size=2)["x"]  # batched windows are scored independently
    np.testing.assert_allclose(per_window, np.array(losses) * 63, rtol=1e-5)


def test_text_and_shards_give_the_same_windows(tiny_model, hf_tokenizer_dir, tmp_path):
    src = write_jsonl(tmp_path / "github" / "val.jsonl", stdlib_texts(10))
    preprocess([str(src)], tmp_path / "shards", hf_tokenizer_dir)
    a = token_windows([str(tmp_path / "shards")], hf_tokenizer_dir, 128, 5)
    b = token_windows([str(src)], hf_tokenizer_dir, 128, 5)
    assert list(a) == ["github"] and a["github"].shape == (5, 128)
    np.testing.assert_array_equal(a["github"], b["github"])


def test_parquet_arrow_and_dataset_dirs_give_the_windows_of_their_jsonl(hf_tokenizer_dir, tmp_path):
    """eval ppl --data and prune --calib read every format preprocess reads (one reader: data/documents.py)."""
    from megatron_ast.pruning.calibration import calibration_samples
    from tests.data.test_documents import write_formats

    texts = stdlib_texts(40)
    paths = write_formats(tmp_path, texts)
    ref = token_windows([str(paths["jsonl"])], hf_tokenizer_dir, 128, 6)["jsonl"]
    calib = calibration_samples([str(paths["jsonl"])], hf_tokenizer_dir, 4, 128)
    for kind in ("parquet", "arrow", "ipc"):
        got = token_windows([str(paths[kind])], hf_tokenizer_dir, 128, 6)
        np.testing.assert_array_equal(got[kind], ref)
        assert (calibration_samples([str(paths[kind])], hf_tokenizer_dir, 4, 128) == calib).all()
    hf = token_windows([str(paths["hf"])], hf_tokenizer_dir, 128, None)["hfdir"]  # train, then validation
    both = write_jsonl(tmp_path / "ref" / "hfdir" / "both.jsonl", texts + texts[:3])
    np.testing.assert_array_equal(hf, token_windows([str(both)], hf_tokenizer_dir, 128, None)["hfdir"])


def test_pick_windows_is_evenly_spaced_and_complete():
    assert pick_windows(1000, 100, None).tolist() == list(range(10))
    assert pick_windows(1000, 100, 3).tolist() == [0, 4, 9]


def test_cli_reports_json_and_rejects_bad_input(tiny_model, hf_tokenizer_dir, tmp_path, capsys):
    _, model_dir = tiny_model
    src = write_jsonl(tmp_path / "book" / "val.jsonl", stdlib_texts(3))
    assert main(["eval", "ppl", "--model", str(model_dir), "--data", str(src), "--seq-len", "64", "--max-windows", "2"]) == 0
    assert '"ppl"' in capsys.readouterr().out
    assert main(["eval", "ppl", "--model", str(tmp_path), "--data", str(src)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["eval", "ppl", "--model", str(model_dir), "--data", str(tmp_path / "none")]) == 2


def test_expect_checks_the_pattern_before_evaluating(tiny_model, tmp_path, capsys):
    _, model_dir = tiny_model
    src = write_jsonl(tmp_path / "github" / "val.jsonl", stdlib_texts(5))
    args = ["--data", str(src), "--seq-len", "64", "--max-windows", "2", "--expect", "2:4"]
    assert main(["eval", "ppl", "--model", str(model_dir), *args]) == 2
    err = capsys.readouterr().err
    assert "is not 2:4: model.layers.0.self_attn.q_proj.weight has" in err and "14 weights fail" in err
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--method", "magnitude", "--out", str(pruned)]) == 0
    capsys.readouterr()
    assert main(["eval", "ppl", "--model", str(pruned), *args]) == 0
    assert "perplexity" in capsys.readouterr().out
