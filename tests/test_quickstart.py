import json

import pytest

from megatron_ast.cli import main


@pytest.mark.assets
@pytest.mark.slow
def test_main_job_end_to_end_writes_report(reference_assets, tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--max-windows", "2", "--lm-eval-n", "8"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.json'}" in printed and "[11/11] lm_eval" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is True
    st = report["stages"]
    from megatron_ast.quickstart import STAGES

    assert set(st) == set(STAGES)  # what --stop-after names (the report's keys are sorted)
    assert st["preprocess"]["train"]["tokens"] > 4_000_000 and st["preprocess"]["validation"]["documents"] > 40
    ppl = st["eval_dense"]["perplexity"]
    assert set(ppl) == {"book", "github", "all"} and ppl["book"]["windows"] == 2
    assert 5 < ppl["book"]["ppl"] < 100 and 1 < ppl["github"]["ppl"] < 50
    assert st["prune"]["all_valid"] is True and st["prune"]["sparsity"] == pytest.approx(0.5)
    sparse = st["eval_pruned"]["perplexity"]  # base + the fitted branch
    assert st["eval_pruned"]["slorb_adapter"] and st["eval_pruned_base"]["slorb_adapter"] is None
    assert sparse["book"]["ppl"] > ppl["book"]["ppl"]  # 2:4 without training costs quality ...
    assert sparse["book"]["ppl"] < 10 * ppl["book"]["ppl"]  # ... but SparseGPT keeps the model usable
    ast = st["train_ast"]
    assert ast["method"] == "ast" and ast["world_size"] == 2 and ast["sparse_linears"] == 210
    assert ast["steps"] == 12 and ast["tokens"] == 12 * 4 * 256 and ast["teacher_unchanged"] is True
    assert ast["ppl_after"]["all"]["ppl"] < 2 * ast["ppl_before"]["all"]["ppl"]
    assert (out / "ast" / "checkpoints" / "latest").is_file()
    exported = st["export_ast"]["perplexity"]  # the exported HF dir with its adapter, on the dense model's windows
    assert st["export_ast"]["slorb_adapter"] and st["eval_ast_base"]["slorb_adapter"] is None
    assert exported["all"]["ppl"] < sparse["all"]["ppl"]  # AST improved on its one-shot init
    assert exported["all"]["ppl"] != st["eval_ast_base"]["perplexity"]["all"]["ppl"]  # the branch is measured
    q = st["quantize_ast"]
    assert q["compression_vs_fp32"]["decoder_linears"] >= 10 and q["perplexity"]["all"]["ppl"] < 2 * exported["all"]["ppl"]
    final = report["final"]
    assert [r["model"] for r in final] == ["dense", "one-shot SparseGPT 2:4 + SLoRB", "one-shot 2:4, no adapter",
                                           "AST 2:4 + SLoRB", "AST 2:4, no adapter", "AST 2:4 + int4 + SLoRB"]
    assert all(0 <= r["code_next_line_acc"] <= 1 and 0 <= r["shakespeare_cloze_acc"] <= 1 for r in final)
    assert final[0]["ppl"] == ppl["all"]["ppl"] and final[5]["size_mib"] < final[3]["size_mib"] / 4
    assert final[4]["size_mib"] < final[3]["size_mib"] and st["quantize_ast"]["slorb_adapter"]
    assert final[2]["size_mib"] < final[1]["size_mib"] and final[1]["ppl"] != final[2]["ppl"]
    assert "AST 2:4 + int4 + SLoRB" in printed and "[train] step 12/12 loss" in printed  # the table; live progress
