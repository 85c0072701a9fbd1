"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer.

The tokenizer comes from the default model's converted checkpoint
(``recall.model_loading.materialize``); converting the packaged GGUF happens once per
machine and is cached under ``$RECALL_MEMORY_CACHE`` (default ``~/.cache/recall_memory``).
"""
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from recall.model_loading import materialize, resolve_model_source

# The tiny model's matmuls are microseconds long: a second OpenMP thread only adds
# synchronisation (and stalls badly when the machine is busy).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def default_model_dir():
    return materialize(resolve_model_source())


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def make_tiny_model(tokenizer, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=tokenizer.bos_token_id)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    return make_tiny_model(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """The tiny model saved as an ordinary HF checkpoint (loadable by path)."""
    path = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
