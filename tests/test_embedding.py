"""Tests for recall.get_text_embedding on the tiny random Llama (fixtures in conftest.py)."""
import pytest
import torch

from recall.get_text_embedding import (TEMPLATES, backbone, extract_last_token_embedding,
                                       last_token_positions)

SHORT = "I have a dog."
LONGER = ["My sister Marta lives in Madrid and works as an architect.",
          "I take Portuguese lessons on Saturday mornings, before I go bouldering with friends.",
          "Hi"]


def embed(model, tokenizer, texts, **kw):
    kw.setdefault("normalize", False)  # raw states: a stricter comparison than unit vectors
    return extract_last_token_embedding(model, tokenizer, texts, **kw)


@pytest.fixture(params=["right", "left"])
def padded_tokenizer(request, tokenizer):
    """The shared tokenizer with the given padding side, restored afterwards."""
    old = tokenizer.padding_side
    tokenizer.padding_side = request.param
    yield tokenizer
    tokenizer.padding_side = old


def reference_state(model, ids):
    """Last-token final hidden state of one unpadded sequence of token ids."""
    with torch.no_grad():
        return backbone(model)(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]


def test_embedding_does_not_depend_on_batch_or_padding(tiny_model, padded_tokenizer):
    texts = [SHORT] + LONGER
    lengths = {len(padded_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts}
    assert len(lengths) == len(texts)  # every text is padded in a shared batch except the longest
    alone = torch.stack([embed(tiny_model, padded_tokenizer, [t])[0] for t in texts])
    one_batch = embed(tiny_model, padded_tokenizer, texts, batch_size=len(texts))
    two_batches = embed(tiny_model, padded_tokenizer, texts, batch_size=2)
    torch.testing.assert_close(one_batch, alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(two_batches, alone, atol=1e-4, rtol=1e-4)


def test_embedding_is_the_last_token_state(tiny_model, padded_tokenizer):
    ids = padded_tokenizer(SHORT, add_special_tokens=False)["input_ids"]
    got = embed(tiny_model, padded_tokenizer, [SHORT] + LONGER)[0]
    torch.testing.assert_close(got, reference_state(tiny_model, ids), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, reference_state(tiny_model, ids[:-1]), atol=1e-3)


@pytest.mark.parametrize("mask, expected", [
    ([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], [2, 4, 0]),  # right padding
    ([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], [4, 4, 4]),  # left padding
])
def test_last_token_positions(mask, expected):
    assert last_token_positions(torch.tensor(mask)).tolist() == expected
    assert last_token_positions(torch.tensor(mask, dtype=torch.bool)).tolist() == expected


def test_normalized_rows_are_unit_vectors(tiny_model, tokenizer):
    texts = [SHORT] + LONGER
    out = extract_last_token_embedding(tiny_model, tokenizer, texts, normalize=True)
    assert out.shape == (len(texts), tiny_model.config.hidden_size)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(texts)))
    raw = embed(tiny_model, tokenizer, texts)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(len(texts)), atol=1e-2)
    torch.testing.assert_close(out, torch.nn.functional.normalize(raw, dim=-1))


def test_empty_input(tiny_model, tokenizer):
    out = extract_last_token_embedding(tiny_model, tokenizer, [])
    assert out.shape == (0, tiny_model.config.hidden_size)


def test_left_truncation_keeps_the_end(tiny_model, padded_tokenizer):
    max_length = 16
    text = " ".join(f"fact number {i} about the user." for i in range(10))
    ids = padded_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 2 * max_length
    got = embed(tiny_model, padded_tokenizer, [text, SHORT], max_length=max_length)[0]
    torch.testing.assert_close(got, reference_state(tiny_model, ids[-max_length:]), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, reference_state(tiny_model, ids[:max_length]), atol=1e-3)
    assert padded_tokenizer.truncation_side == "right"  # the caller's setting is restored


def test_template_is_applied(tiny_model, tokenizer):
    template = TEMPLATES["prompteol"]
    texts = [SHORT, LONGER[0]]
    templated = embed(tiny_model, tokenizer, texts, template=template)
    preformatted = embed(tiny_model, tokenizer, [template.format(text=t) for t in texts])
    torch.testing.assert_close(templated, preformatted)
    raw = embed(tiny_model, tokenizer, texts)
    assert not torch.allclose(templated, raw, atol=1e-3)
    # the two texts end in the same template tokens yet still get different vectors
    assert not torch.allclose(templated[0], templated[1], atol=1e-3)


def test_recall_suffix_template(tiny_model, tokenizer):
    ids = tokenizer(SHORT + " Remember:", add_special_tokens=False)["input_ids"]
    got = embed(tiny_model, tokenizer, [SHORT], template="{text} Remember:")[0]
    torch.testing.assert_close(got, reference_state(tiny_model, ids), atol=1e-4, rtol=1e-4)


def test_empty_text_is_a_clear_error(tiny_model, tokenizer):
    import pytest as _pytest
    from recall.get_text_embedding import extract_last_token_embedding as _embed

    with _pytest.raises(ValueError, match="empty"):
        _embed(tiny_model, tokenizer, ["fine", "  "])
