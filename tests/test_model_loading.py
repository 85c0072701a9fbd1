import pytest
import torch

from recall.model_loading import (DEFAULT_GGUF_FILE, ModelNotFoundError, choose_runtime,
                                  load_model_and_tokenizer, resolve_model_source)


def test_default_source_is_the_packaged_gguf():
    src = resolve_model_source()
    assert src.kind == "gguf" and src.gguf_file == DEFAULT_GGUF_FILE
    assert resolve_model_source("default") == src


def test_missing_local_directory_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match=str(missing)):
        resolve_model_source(str(missing))


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="x.gguf"):
        resolve_model_source(str(tmp_path), gguf_file="x.gguf")
    with pytest.raises(ModelNotFoundError, match="y.gguf"):
        resolve_model_source(str(tmp_path / "y.gguf"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model_source(str(tmp_path))


def test_hub_id_is_not_touched_until_loading():
    src = resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert src.kind == "hub" and src.location == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_runtime_choices():
    assert choose_runtime("cpu", "fp32").autocast_dtype is None
    rt = choose_runtime("cpu", "bf16")
    assert rt.param_dtype == torch.float32 and rt.autocast_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        choose_runtime("cpu", "fp8")


def test_loads_a_local_directory(tiny_model_dir):
    lm = load_model_and_tokenizer(str(tiny_model_dir), device="cpu", precision="fp32")
    assert lm.source.kind == "dir"
    assert lm.tokenizer.pad_token is not None
    assert not getattr(lm.model.config, "quantization_config", None)
    out = lm.model(**lm.tokenizer(["hello"], return_tensors="pt"))
    assert out.logits.shape[-1] == lm.model.config.vocab_size


@pytest.mark.slow
def test_default_model_is_plain_and_serialisable(tmp_path):
    lm = load_model_and_tokenizer(device="cpu", precision="fp32")
    assert not getattr(lm.model.config, "quantization_config", None)
    assert not getattr(lm.model, "is_quantized", False)
    lm.model.save_pretrained(tmp_path)  # a GGUF-flagged model would raise here
    assert (tmp_path / "model.safetensors").is_file()
