import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from memory.token_manager import (INIT_WORDS, MEMORY_PAD_TOKEN, MEMORY_TOKENS, RECALL_TOKEN,
                                  add_memory_tokens, memory_token_ids)


def _tiny(tokenizer, rows=None, tie=True):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=rows or len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


@pytest.fixture
def tok(tokenizer):
    return copy.deepcopy(tokenizer)


def _expected_row(tokenizer, weight, token):
    ids = []
    for w in INIT_WORDS[token]:
        ids += tokenizer.encode(" " + w, add_special_tokens=False)
    return weight[ids].mean(0)


def test_adds_single_tokens_and_initialises_rows_from_related_words(tok):
    model = _tiny(tok)
    before = model.get_input_embeddings().weight.detach().clone()
    ids = add_memory_tokens(model, tok)
    assert set(ids) == set(MEMORY_TOKENS)
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] >= max(ids.values()) + 1
    for token, tid in ids.items():
        assert tok.tokenize(f"a{token}b") == ["a", token, "b"]
        assert torch.allclose(weight[tid], _expected_row(tok, before, token), atol=1e-6)
    # tied head: the output embedding is the same tensor
    assert model.get_output_embeddings().weight.data_ptr() == weight.data_ptr()


def test_idempotent(tok):
    model = _tiny(tok)
    ids = add_memory_tokens(model, tok)
    n_tok, weight = len(tok), model.get_input_embeddings().weight.detach().clone()
    assert add_memory_tokens(model, tok) == ids
    assert len(tok) == n_tok
    assert torch.equal(weight, model.get_input_embeddings().weight)


def test_padded_vocab_is_not_resized(tok):
    rows = len(tok) + 100  # checkpoint pads its matrix beyond the tokenizer
    model = _tiny(tok, rows=rows)
    ids = add_memory_tokens(model, tok)
    assert model.get_input_embeddings().weight.shape[0] == rows
    assert max(ids.values()) < rows


def test_untied_head_rows_initialised_too(tok):
    model = _tiny(tok, tie=False)
    head_before = model.get_output_embeddings().weight.detach().clone()
    ids = add_memory_tokens(model, tok)
    head = model.get_output_embeddings().weight
    assert head.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    tid = ids[RECALL_TOKEN]
    assert torch.allclose(head[tid], _expected_row(tok, head_before, RECALL_TOKEN), atol=1e-6)


def test_tokens_survive_save_and_reload(tok, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _tiny(tok)
    ids = add_memory_tokens(model, tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert memory_token_ids(tok2) == ids
    assert add_memory_tokens(model2, tok2) == ids and len(tok2) == len(tok)
    assert torch.equal(model2.get_input_embeddings().weight[ids[MEMORY_PAD_TOKEN]],
                       model.get_input_embeddings().weight[ids[MEMORY_PAD_TOKEN]])


def test_memory_token_ids_requires_extension(tok):
    with pytest.raises(KeyError, match="add_memory_tokens"):
        memory_token_ids(tok)
