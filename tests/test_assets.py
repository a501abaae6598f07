import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ast import assets


def test_play_scenes_split_on_scene_headings():
    md = "# Macbeth\n\n## ACT I\n\n## SCENE I. A desert place.\n\nThunder.\n\n### SCENE II. A camp.\n\nAlarum.\n"
    scenes = assets.play_scenes(md)
    assert [h for h, _ in scenes] == ["SCENE I. A desert place.", "SCENE II. A camp."]
    assert scenes[1][1] == "Macbeth\n\nSCENE II. A camp.\n\nAlarum.\n" and "ACT" not in scenes[0][1]


@pytest.mark.assets
def test_reference_corpus_is_split_by_document_and_deterministic(reference_assets):
    ids = {}
    for dom in assets.DOMAINS:
        for split in assets.SPLITS:
            lines = Path(reference_assets["corpus"][dom][split]).read_text().splitlines()
            ids[dom, split] = {json.loads(l)["meta"]["id"] for l in lines}
            assert all(assets._is_validation(i) == (split == "validation") for i in ids[dom, split])
        assert not ids[dom, "train"] & ids[dom, "validation"]
        assert len(ids[dom, "validation"]) >= 20 and len(ids[dom, "train"]) > 10 * len(ids[dom, "validation"])
    assert any(i.startswith("macbeth/") for i in ids["book", "train"] | ids["book", "validation"])


@pytest.mark.assets
def test_model_dir_is_a_plain_fp32_hf_llama(reference_assets):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(reference_assets["model"])
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30 and cfg.hidden_size == 576
    assert getattr(cfg, "quantization_config", None) is None
    assert (Path(reference_assets["model"]) / "model.safetensors").stat().st_size > 500e6  # fp32, 135M params


@pytest.mark.assets
def test_second_call_does_nothing_and_json_names_every_path(reference_assets):
    stamp = Path(reference_assets["model"], "model.safetensors").stat().st_mtime_ns
    out = subprocess.run([sys.executable, "-m", "megatron_ast.cli", "assets", "--json"],
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert info == reference_assets and out.stderr == ""
    assert Path(info["model"], "model.safetensors").stat().st_mtime_ns == stamp
    assert all(Path(p).is_file() for d in info["corpus"].values() for p in d.values())


def test_half_built_cache_does_not_look_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_AST_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_github_docs", lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        assets._build_corpus(assets.cache_root() / "corpus")
    assert not (assets.cache_root() / "corpus").exists()
    assert assets.describe()["complete"] is False
