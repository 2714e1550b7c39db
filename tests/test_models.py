"""Model specs: directories, hub ids (through the hub cache, offline), GGUF conversion (atomic),
tiny-random, precision, and the errors for bad specs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from rlhfkit.errors import UserError
from rlhfkit.models import loading
from rlhfkit.models.loading import _atomic_build, load_causal_lm, resolve_model_path, resolve_precision


def test_tiny_random_is_a_small_llama_with_smollm2_tokenizer(tiny):
    cfg = tiny.model.config
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 2 and cfg.hidden_size == 64
    assert len(tiny.tokenizer) == cfg.vocab_size == 49152
    assert tiny.tokenizer.eos_token == "<|im_end|>"
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in tiny.model.modules())


def test_directory_spec_and_errors(tiny_path, tmp_path):
    assert resolve_model_path(tiny_path) == tiny_path
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="without config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no such GGUF"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(UserError, match="not a directory, .gguf file, hub id"):
        resolve_model_path("./nowhere/at/all")


def test_hub_id_loads_through_the_hub_cache_offline(tiny_path, tmp_path, monkeypatch):
    """A hub id goes to transformers unchanged; here the 'download' is a hub-cache snapshot."""
    snapshot = tmp_path / "hub" / "models--someone--tiny-model" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_path, snapshot)
    (tmp_path / "hub" / "models--someone--tiny-model" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-model" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert resolve_model_path("someone/tiny-model") == "someone/tiny-model"
    loaded = load_causal_lm("someone/tiny-model")
    assert loaded.model.config.hidden_size == 64
    with pytest.raises(UserError, match="cannot load"):
        load_causal_lm("someone/not-in-cache")


def test_atomic_build_leaves_nothing_on_a_crash(tmp_path):
    target = tmp_path / "models" / "m"

    def crash(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt  # the conversion is killed half-way

    with pytest.raises(KeyboardInterrupt):
        _atomic_build(target, crash)
    assert not target.exists()
    assert list((tmp_path / "models").iterdir()) == []  # no temporary directory left either

    def ok(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")

    assert _atomic_build(target, ok) == target and (target / "config.json").exists()


def test_gguf_file_converts_once_into_a_plain_hf_directory(tmp_path, monkeypatch):
    """The embedded GGUF through the generic .gguf path, into a fresh cache."""
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "cache"))
    gguf = loading._embedded_gguf()
    link = tmp_path / "model.gguf"
    os.symlink(gguf, link)
    path = Path(resolve_model_path(str(link)))
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    config = (path / "config.json").read_text()
    assert "quantization_config" not in config
    again = resolve_model_path(str(link))  # cached: same directory, no second conversion
    assert Path(again) == path and len(list((tmp_path / "cache" / "models" / "gguf").iterdir())) == 1
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)  # plain transformers
    assert model.config.num_hidden_layers == 30


def test_precision_resolution():
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("bf16") == "bf16"
    assert resolve_precision("auto") in ("bf16", "fp32")
    with pytest.raises(UserError, match="expected auto, bf16 or fp32"):
        resolve_precision("fp8")


def test_stop_token_ids_from_the_tokenizer_the_template_and_the_generation_config(tiny, tmp_path):
    from families import tiny_family

    # ChatML (SmolLM2): the end of turn <|im_end|> is the EOS
    assert loading.end_of_turn_id(tiny.tokenizer) == tiny.tokenizer.eos_token_id == 2
    assert loading.stop_token_ids(tiny.tokenizer, tiny.model) == {2}
    gemma = load_causal_lm(tiny_family("gemma3", tmp_path))
    tok, model = gemma.tokenizer, gemma.model
    eos, eot = tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")
    assert eot != eos and loading.end_of_turn_id(tok) == eot
    assert loading.stop_token_ids(tok) == {eos, eot}
    model.generation_config.eos_token_id = [eos, 7, 9]  # a list: every id
    assert loading.stop_token_ids(tok, model) == {eos, eot, 7, 9}
    model.generation_config.eos_token_id = 5
    assert loading.stop_token_ids(tok, model) == {eos, eot, 5}
    tok.chat_template = None
    assert loading.end_of_turn_id(tok) == eos and loading.stop_token_ids(tok) == {eos}
