"""Checkpoint loading errors are clear and name the file and the problem."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from orbitllm import LLM
from orbitllm.models.errors import ModelLoadError


@pytest.fixture
def copy_of(tiny_models, tmp_path):
    def make(family: str):
        dst = tmp_path / family
        shutil.copytree(tiny_models[family], dst)
        return dst
    return make


def test_missing_shard(copy_of):
    path = copy_of("llama")
    tensors = load_file(str(path / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, str(path / "model-00001-of-00002.safetensors"))
    (path / "model.safetensors").unlink()
    index = {"weight_map": {n: ("model-00001-of-00002.safetensors" if i < half else
                                "model-00002-of-00002.safetensors") for i, n in enumerate(names)}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="missing checkpoint shard.*00002"):
        LLM(str(path))


def test_shape_mismatch_names_the_tensor(copy_of):
    path = copy_of("qwen2")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"mlp\.(gate|up|down)_proj.*shape"):
        LLM(str(path))


def test_missing_weight_is_reported(copy_of):
    path = copy_of("llama")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="norm.weight"):
        LLM(str(path))


def test_sharded_checkpoint_loads(copy_of):
    path = copy_of("llama")
    tensors = load_file(str(path / "model.safetensors"))
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[::2]}, str(path / "a.safetensors"))
    save_file({n: tensors[n] for n in names[1::2]}, str(path / "b.safetensors"))
    (path / "model.safetensors").unlink()
    LLM(str(path), num_kv_blocks=8)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """The hub client offline, over an empty cache of our own: no network in CI."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_hub_id_without_network_is_one_clear_line(offline_hub):
    with pytest.raises(ModelLoadError) as e:
        LLM("someorg/some-model")
    message = str(e.value)
    assert "\n" not in message and "'someorg/some-model'" in message
    assert "Hugging Face hub" in message and "local model folder" in message


def test_hub_id_resolves_through_the_hub_cache(offline_hub, tiny_models):
    """``LLM("org/name")`` with no such local path asks huggingface_hub, which here
    answers from its cache (the layout a download leaves)."""
    commit = "0" * 40
    repo = offline_hub / "models--someorg--tiny"
    shutil.copytree(tiny_models["llama"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    llm = LLM("someorg/tiny", num_kv_blocks=8)
    assert llm.engine.vocab_size > 0 and llm.get_tokenizer() is not None


def test_local_looking_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a Hugging Face model folder"):
        LLM(str(tmp_path / "no" / "such" / "dir"))
