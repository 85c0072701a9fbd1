"""The recall loop's trigger (recall "auto") and verified spans, on the tiny model."""
import copy

import numpy as np
import pytest
import torch

from memory.token_manager import MEMORY_PAD_TOKEN, RECALL_END_TOKEN, RECALL_TOKEN, add_memory_tokens
from recall.generation import Hit, RecallEngine, recall_spans
from recall.text_memory_train import MemoryProjector
from tests.conftest import make_tiny_model


@pytest.fixture
def engine(tokenizer):
    tok = copy.deepcopy(tokenizer)
    lm = make_tiny_model(tok)
    ids = add_memory_tokens(lm, tok)
    return RecallEngine(lm, tok, ids, MemoryProjector(64, 64, 1.0, 0)), tok, ids


def _vec(seed):
    return np.random.default_rng(seed).standard_normal(64).astype(np.float32)


def _scripted(engine, monkeypatch, choose, probe: bool = True):
    """Make the model's logits put all mass on ``choose(step)`` (None: leave the logits); step 0
    is the generation's prompt pass, after the probe's pass when ``probe`` (recall auto/force)."""
    real_forward = engine._forward
    state = {"n": -1 if probe else 0}

    def forward(emb, mask, past, *rest):
        hidden, logits, past = real_forward(emb, mask, past, *rest)
        token = choose(state["n"]) if state["n"] >= 0 else None
        state["n"] += 1
        if token is not None:
            logits = torch.full_like(logits, -1e9)
            logits[:, token] = 0
        return hidden, logits, past

    monkeypatch.setattr(engine, "_forward", forward)
    return state


def test_auto_recall_probes_every_turn_and_injects_only_above_the_threshold(engine):
    eng, tok, ids = engine
    scores = {0: 0.9, 1: 0.2}  # the first prompt's best memory passes, the second's does not
    calls = []

    def search(queries):
        calls.append(len(queries))
        return [[Hit(7 + i, scores[i], "The user lives in Porto.", _vec(i))] for i in range(len(queries))]

    about_me, general = eng.generate(["Where do I live?", "Why is the sky blue?"], search, threshold=0.5,
                                     max_new_tokens=6)
    assert calls == [2]  # one probe for both turns; the recalling row replays it, no second search
    assert about_me.recalled() and about_me.recalls[0].memory_id == 7
    assert about_me.tokens.count(ids[MEMORY_PAD_TOKEN]) == 1
    assert about_me.probe.score == 0.9
    # below the threshold: no span at all, <recall> never chosen, and the answer is the model alone
    assert not general.recalls and not general.recalled() and general.probe.score == 0.2
    assert ids[RECALL_TOKEN] not in general.tokens and ids[MEMORY_PAD_TOKEN] not in general.tokens
    [alone] = eng.generate(["Why is the sky blue?"], search, recall="model", max_recalls=0, max_new_tokens=6)
    assert alone.tokens == general.tokens
    with pytest.raises(ValueError, match="recall"):
        eng.generate(["hi"], search, recall="sometimes")


def test_auto_recall_never_lets_an_unrecalled_turn_ask_by_itself(engine, monkeypatch):
    eng, tok, ids = engine
    _scripted(eng, monkeypatch, lambda n: ids[RECALL_TOKEN])  # a model that always wants to recall
    [answer] = eng.generate(["Why is the sky blue?"], lambda q: [[Hit(1, 0.1, "x", _vec(0))] for _ in q],
                            threshold=0.5, max_new_tokens=4)
    assert ids[RECALL_TOKEN] not in answer.tokens and not answer.recalls


def test_a_span_that_decodes_otherwise_shows_the_stored_memory_and_says_where_it_differed(engine, monkeypatch):
    """verify: the model's first span token differs from the stored text: the stored tokens are
    forced from there, the span ends with </recall> at the memory's end, and the trace keeps the
    model's token; the answer then goes on after the true memory."""
    eng, tok, ids = engine
    stored = "The user lives in Porto."
    wrong = tok(" Lisbon", add_special_tokens=False)["input_ids"][0]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    # step 0 is the prompt; then the model keeps choosing " Lisbon" in the span, then ends its turn
    n_span = len(eng.memory_ids(stored)) + 1
    _scripted(eng, monkeypatch, lambda n: wrong if n <= n_span + 1 else im_end)
    [answer] = eng.generate(["Where do I live?"], lambda q: [[Hit(3, 0.9, stored, _vec(1))]], recall="force",
                            threshold=0.5, max_new_tokens=40)
    [r] = answer.recalls
    assert r.decoded == stored and r.verified is False and r.diverged_at == 0 and r.model_token == " Lisbon"
    pad = answer.tokens.index(ids[MEMORY_PAD_TOKEN])
    assert answer.tokens[pad + 1:pad + 1 + n_span] == eng.memory_ids(stored) + [ids[RECALL_END_TOKEN]]
    assert recall_spans(answer.text) == [stored]
    assert "Lisbon" in answer.final  # what the model said after the span is its own

    # the same model unverified shows what it decoded: an invented span
    [free] = eng.generate(["Where do I live?"], lambda q: [[Hit(3, 0.9, stored, _vec(1))]], recall="force",
                          threshold=0.5, max_new_tokens=8, verify=False)
    assert free.recalls[0].verified is None and "Porto" not in free.recalls[0].decoded


def test_a_span_the_model_decodes_itself_is_marked_verified(engine, monkeypatch):
    eng, tok, ids = engine
    stored = "The user has a dog."
    want = eng.memory_ids(stored) + [ids[RECALL_END_TOKEN], tok.convert_tokens_to_ids("<|im_end|>")]
    _scripted(eng, monkeypatch, lambda n: want[n - 1] if 1 <= n <= len(want) else None)
    [answer] = eng.generate(["Do I have pets?"], lambda q: [[Hit(3, 0.9, stored, _vec(2))]], recall="force",
                            threshold=0.5, max_new_tokens=20)
    assert answer.recalls[0].verified is True and answer.recalls[0].decoded == stored


def test_follow_on_spans_are_verified_against_their_stored_text(engine, monkeypatch):
    eng, tok, ids = engine
    hits = [Hit(1, 0.9, "The user lives in Porto.", _vec(1)), Hit(2, 0.8, "The user has a dog.", _vec(2))]
    monkeypatch.setattr(eng, "decode_follow_ons",
                        lambda contexts, follow: [tok(" a cat", add_special_tokens=False)["input_ids"] for _ in follow])
    [answer] = eng.generate(["hi"], lambda q: [list(hits) for _ in q], recall="force", threshold=0.5,
                            max_new_tokens=40, memories_per_recall=2)
    assert [r.decoded for r in answer.recalls[:2]] == [h.text for h in hits]
    assert answer.recalls[1].verified is False and answer.recalls[1].model_token == " a"
    assert recall_spans(answer.text)[:2] == [h.text for h in hits]


def test_context_tokens_count_the_prompt_and_the_recall_span(engine, monkeypatch):
    eng, tok, ids = engine
    stored = "The user lives in Porto."
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    word = tok(" Porto", add_special_tokens=False)["input_ids"][0]
    n_span = len(eng.memory_ids(stored)) + 1
    _scripted(eng, monkeypatch, lambda n: word if n == n_span + 1 else (im_end if n > n_span + 1 else None))
    prompt = eng.prompt_text("Where do I live?", force_recall=True)
    [answer] = eng.generate(["Where do I live?"], lambda q: [[Hit(3, 0.9, stored, _vec(1))]], recall="force",
                            threshold=0.5, max_new_tokens=40)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert answer.final == tok.decode([word]).strip()
    assert answer.context_tokens == n_prompt + 1 + n_span  # the pad, the memory's tokens and </recall>
