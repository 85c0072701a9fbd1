"""Step 2 (EnhancedTextMemoryTrainer) and the recall loop on the tiny model."""
import copy
import random

import numpy as np
import pytest
import torch

from memory.cues import Cue
from memory.decoding_step import SampleBuilder, decode_contexts, exact_match_rate, parse_mix, question_contexts
from memory.questions import second_person
from memory.sft_data import SFTExample
from memory.token_manager import MEMORY_PAD_TOKEN, RECALL_END_TOKEN, RECALL_TOKEN, add_memory_tokens
from recall.generation import NEUTRAL_CONTEXT, Hit, RecallEngine
from recall.text_memory_train import (IGNORE, DecodingCollator, EnhancedTextMemoryTrainer, MemoryDecodingArguments,
                                      MemoryProjector, ResampledDataset, Segment, assemble, build_decoder_model)
from tests.conftest import make_tiny_model

FACTS = ["The user lives in Porto.", "The user has a dog called Max.", "The user works as a nurse."]
SFT = [SFTExample("Say hi.", "Hi there!"), SFTExample("Name a colour.", "Blue."),
       SFTExample("Count to three.", "One, two, three.")]


@pytest.fixture
def tiny(tokenizer):
    tok = copy.deepcopy(tokenizer)
    lm = make_tiny_model(tok)
    ids = add_memory_tokens(lm, tok)
    return lm, tok, ids


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=3, learning_rate=1e-2,
                logging_steps=1, save_strategy="no", lora_r=8, lora_alpha=16, use_cpu=True, seed=0,
                projector_hidden=64, num_train_epochs=1, min_steps=0, warmup_ratio=0.0)
    base.update(kw)
    return MemoryDecodingArguments(**base)


def test_injection_replaces_the_pad_embedding_and_only_there(tiny, tmp_path):
    lm, tok, ids = tiny
    model = build_decoder_model(lm, ids, _args(tmp_path), memory_dim=64).eval()  # no noise
    pad = ids[MEMORY_PAD_TOKEN]
    input_ids = torch.tensor([[10, 11, pad, 12], [13, pad, 14, 15]])
    vectors = torch.randn(2, 64)
    plain = model.token_rows(input_ids)
    emb = model.embed(input_ids, vectors)
    expected = model.projector(vectors)
    assert torch.allclose(emb[0, 2], expected[0]) and torch.allclose(emb[1, 1], expected[1])
    untouched = torch.ones_like(input_ids, dtype=torch.bool)
    untouched[0, 2] = untouched[1, 1] = False
    assert torch.equal(emb[untouched], plain[untouched])
    with pytest.raises(ValueError, match="2 <|memory_pad|> positions but 1"):
        model.embed(input_ids, vectors[:1])


def test_projector_rejects_a_vector_of_the_wrong_width():
    proj = MemoryProjector(64, 64, embed_norm=1.0)
    with pytest.raises(ValueError, match="width 32"):
        proj(torch.randn(1, 32))


def test_labels_mask_exactly_the_context(tiny):
    _, tok, ids = tiny
    builder = SampleBuilder(tok, FACTS, [["Where do I live?"]] * 3, SFT, max_length=256)
    s = builder.memory_sample(0, 0)
    n_ctx = len(builder.contexts[0][0])
    assert s["labels"][:n_ctx] == [IGNORE] * n_ctx
    assert s["input_ids"][n_ctx] == ids[RECALL_TOKEN] and s["labels"][n_ctx] == ids[RECALL_TOKEN]
    assert s["input_ids"][n_ctx + 1] == ids[MEMORY_PAD_TOKEN] and s["labels"][n_ctx + 1] == IGNORE
    assert s["labels"][n_ctx + 2:] == s["input_ids"][n_ctx + 2:]
    assert s["input_ids"][-1] == ids[RECALL_END_TOKEN]
    assert tok.decode(s["input_ids"][n_ctx + 2:-1]) == FACTS[0]
    sft = builder.sft_sample(1)
    n_prompt = len(builder.sft_prompts[1])
    assert sft["labels"][:n_prompt] == [IGNORE] * n_prompt and IGNORE not in sft["labels"][n_prompt:]
    # no activation phrase contains <recall>, and the phrase itself is context (masked)
    sandwich = builder.sandwich_sample(2, 0)
    r = sandwich["input_ids"].index(ids[RECALL_TOKEN])
    assert all(label == IGNORE for label in sandwich["labels"][:r])


def test_answer_samples_recall_the_memory_and_say_it_back(tiny):
    _, tok, ids = tiny
    contexts = [["I moved to Porto.", "Where do I live?", "What do you remember about me?"]] * 3
    answers = [second_person(f) for f in FACTS[:2]] + [None]
    assert answers[:2] == ["You live in Porto.", "You have a dog called Max."]
    builder = SampleBuilder(tok, FACTS, contexts, SFT, max_length=256, mix="1:1:0:2", answers=answers,
                            question_contexts=[[1, 2]] * 3)
    s = builder.answer_sample(0, 1)
    n_ctx = len(builder.contexts[0][1])
    assert s["labels"][:n_ctx] == [IGNORE] * n_ctx and s["kind"] == "answer" and s["recall_target"] == 0
    assert s["input_ids"][n_ctx] == ids[RECALL_TOKEN] and s["labels"][n_ctx + 1] == IGNORE  # the pad
    end = s["input_ids"].index(ids[RECALL_END_TOKEN])
    assert tok.decode(s["input_ids"][n_ctx + 2:end]) == FACTS[0]
    assert s["labels"][end:] == s["input_ids"][end:]  # the memory, </recall> and the answer are all trained
    assert tok.decode(s["input_ids"][end + 1:]).startswith(" You live in Porto.")
    for epoch in range(3):
        items = builder.epoch(epoch, random.Random(epoch))
        answer_items = [i for i in items if i["kind"] == "answer"]
        # two answer samples per memory that has an answer, each after a question (contexts 1 and 2);
        # the memory without one gets memory samples instead
        assert sorted(i["memory_row"] for i in answer_items) == [0, 0, 1, 1]
        assert all(i["input_ids"][:n_ctx] != builder.contexts[0][0] for i in answer_items)
        assert sorted(i["memory_row"] for i in items if i["kind"] == "memory") == [0, 1, 2, 2, 2]
    assert parse_mix("2:1:2") == (2, 1, 2, 0) and parse_mix("1:1:0:1") == (1, 1, 0, 1)
    assert parse_mix("0:1:0:1") == (0, 1, 0, 1)
    for bad in ("2:1", "a:b:c", "0:1:2", "1:1:1:-1", "1:1:1:1:1"):
        with pytest.raises(ValueError, match="decode_mix"):
            parse_mix(bad)


def test_every_memory_is_said_back_in_its_answer_and_only_what_it_holds():
    """The answer after a recall (memory.questions.said_back): the memory in the second person when
    it is about the user, else as stored; the answer samples end with the template's end of turn."""
    from memory.questions import said_back

    assert said_back("The user's sister Marta lives in Madrid.") == "Your sister Marta lives in Madrid."
    assert said_back("The user is allergic to peanuts.") == "You are allergic to peanuts."
    assert said_back("Caroline went to a support group on 7 May 2023.") == \
        "Caroline went to a support group on 7 May 2023."


def test_answer_samples_end_with_the_end_of_turn_token(tiny):
    _, tok, ids = tiny
    from memory.questions import said_back
    from memory.token_manager import end_of_turn_id

    facts = ["Caroline went to a support group on 7 May 2023."]
    builder = SampleBuilder(tok, facts, [["When did Caroline go to a support group?", NEUTRAL_CONTEXT]], SFT,
                            max_length=256, mix="1:1:0:2", answers=[said_back(f) for f in facts],
                            question_contexts=[[0, 1]])
    s = builder.answer_sample(0, 0)
    end = s["input_ids"].index(ids[RECALL_END_TOKEN])
    assert tok.decode(s["input_ids"][end + 1:-1]) == " " + facts[0]
    assert s["input_ids"][-1] == end_of_turn_id(tok) and s["labels"][-1] == s["input_ids"][-1]


def test_memories_with_a_close_neighbour_get_more_memory_samples(tiny):
    from memory.decoding_step import crowded_memories

    rng = np.random.default_rng(0)
    base, spread = rng.normal(size=64), rng.normal(size=(4, 64))
    # a shared direction (as in raw last-token states), two near-twins and two far memories
    bank = base * 5 + np.stack([spread[0], spread[0] + 0.1 * spread[1], spread[2], spread[3]])
    assert crowded_memories(bank, 0.7).tolist() == [True, True, False, False]
    assert crowded_memories(bank, 0.7, chunk=1).tolist() == [True, True, False, False]  # chunked: the same
    assert crowded_memories(bank[:1], 0.7).tolist() == [False]
    _, tok, _ = tiny
    builder = SampleBuilder(tok, FACTS, [["q?"]] * 3, SFT, max_length=128, mix="1:1:0",
                            extra_memory_samples=[2, 0, 0])
    items = builder.epoch(0, random.Random(0))
    assert sorted(i["memory_row"] for i in items if i["kind"] == "memory") == [0, 0, 0, 1, 2]
    with pytest.raises(ValueError, match="extra-sample counts"):
        SampleBuilder(tok, FACTS, [["q?"]] * 3, SFT, max_length=128, extra_memory_samples=[1])


def test_question_contexts_leave_out_what_the_user_said():
    cues = [Cue("text", "The user lives in Porto."), Cue("source", "I moved to Porto!"),
            Cue("template", "Where do I live?"), Cue("template", "Do I live in Porto?"), Cue("question", "Which city?")]
    assert decode_contexts(cues) == ["I moved to Porto!", "Where do I live?", "Which city?", NEUTRAL_CONTEXT]
    assert question_contexts(cues) == [1, 2, 3]


def test_long_context_is_cut_from_the_left():
    s = assemble([Segment(list(range(100)), False), Segment([7, 8, 9], True)], max_length=10)
    assert s["input_ids"] == [93, 94, 95, 96, 97, 98, 99, 7, 8, 9]
    assert s["labels"][-3:] == [7, 8, 9] and s["labels"][:7] == [IGNORE] * 7


def test_every_memory_is_sampled_every_epoch_even_one_or_odd(tiny):
    _, tok, _ = tiny
    for n in (1, 3):
        builder = SampleBuilder(tok, FACTS[:n], [["q?"]] * n, SFT, max_length=128)
        for epoch in range(3):
            items = builder.epoch(epoch, random.Random(epoch))
            assert len(items) == 5 * n  # default mix 2:1:2
            assert sorted(i["memory_row"] for i in items if i["kind"] == "memory") == sorted(list(range(n)) * 2)
            assert sorted(i["memory_row"] for i in items if i["kind"] == "sandwich") == list(range(n))


def test_collator_batches_mixed_kinds(tiny):
    _, tok, ids = tiny
    builder = SampleBuilder(tok, FACTS, [["q?"]] * 3, SFT, max_length=128)
    vectors = torch.randn(3, 64)
    collate = DecodingCollator(tok.pad_token_id, vectors, ids[MEMORY_PAD_TOKEN])
    batch = collate([builder.sft_sample(0), builder.memory_sample(2, 0), builder.sandwich_sample(1, 1)])
    assert batch["memory_vectors"].shape == (2, 64)
    assert torch.equal(batch["memory_vectors"][0], vectors[2]) and torch.equal(batch["memory_vectors"][1], vectors[1])
    assert batch["recall_targets"].tolist() == [-1, 2, -1]


def test_loss_and_gradients_under_bf16_autocast(tiny, tmp_path):
    """GPU users train with bf16=True (autocast): the fp32 token rows, the projector and the
    bf16 matmuls must mix (index_add of bf16 output-row logits into fp32 logits used to fail)."""
    lm, tok, ids = tiny
    model = build_decoder_model(lm, ids, _args(tmp_path), memory_dim=64).train()
    builder = SampleBuilder(tok, FACTS, [["q?"]] * 3, SFT, max_length=128)
    batch = DecodingCollator(tok.pad_token_id, torch.randn(3, 64), ids[MEMORY_PAD_TOKEN])(
        [builder.sft_sample(0), builder.memory_sample(2, 0), builder.sandwich_sample(1, 1)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = model(**batch)
    loss = parts["loss"]
    assert torch.isfinite(loss) and loss.dtype == torch.float32 and not parts["lm"].requires_grad
    loss.backward()
    assert model.token_rows.delta.grad is not None and model.token_rows.delta.grad.abs().sum() > 0
    assert model.token_rows.delta.dtype == torch.float32


def test_memories_decode_after_training_and_rows_change(tokenizer, tmp_path):
    # a random model with 0.02-scale weights cannot make a peaked next-token distribution
    # (logits stay within about +-1), so this one is initialised at a larger scale. At 0.3 the
    # run stalled at 2 of 3 memories for 2 of 5 seeds on a 2-core EPYC with AVX512-BF16; at 0.15
    # all 5 seeds decoded all three there within 30 epochs
    tok = copy.deepcopy(tokenizer)
    lm = make_tiny_model(tok, initializer_range=0.15)
    ids = add_memory_tokens(lm, tok)
    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(len(FACTS), 64), dim=-1)
    # all three kinds, with a smaller SFT share than the default: the tiny model's capacity is small
    builder = SampleBuilder(tok, FACTS, [["Tell me."]] * 3, SFT, max_length=128, mix="2:1:1")
    dataset = ResampledDataset(builder.epoch, seed=0)
    # up to 100 epochs, stopping at the first epoch end where every memory decodes (teacher-forced check)
    args = _args(tmp_path, num_train_epochs=100, lora_target_modules="q_proj,v_proj,o_proj,up_proj,down_proj",
                 stop_at_exact_match=1.0)
    model = build_decoder_model(lm, ids, args, memory_dim=64, memory_bank=bank)
    rows_before = model.token_rows.delta.detach().clone()
    checks = [builder.memory_sample(row, 0) for row in range(len(FACTS))]
    trainer = EnhancedTextMemoryTrainer(model=model, args=args, memory_vectors=bank, tokenizer=tok,
                                        train_dataset=dataset, check_samples=checks)
    assert trainer.decode_check() == 0.0  # the random model decodes nothing
    trainer.train()
    curve = [h["decode_exact_match"] for h in trainer.state.log_history if "decode_exact_match" in h]
    assert len(curve) == round(trainer.state.epoch) and curve[-1] == 1.0 and max(curve[:-1]) < 1.0, str(curve)
    assert trainer.state.epoch < 100  # stopped early
    assert not torch.equal(rows_before, model.token_rows.delta.detach())

    # the check agrees with real greedy decoding memory by memory, also where it fails:
    # memory 2 gets another vector, which decodes to something else (or nothing)
    wrong = bank.clone()
    wrong[2] = torch.nn.functional.normalize(torch.randn(64), dim=-1)
    trainer.data_collator.vectors = wrong
    assert trainer.decode_check() == pytest.approx(2 / 3)
    model.eval()
    merged = model.merged_lm()
    engine = RecallEngine(merged, tok, ids, model.projector)
    assert exact_match_rate(engine.decode_memories(bank.numpy(), context="Tell me."), FACTS) == 1.0
    decoded = engine.decode_memories(wrong.numpy(), context="Tell me.")
    assert [d == f for d, f in zip(decoded, FACTS)] == [True, True, False], decoded


def test_a_stop_share_outside_0_1_is_refused(tmp_path):
    from memory.config import parse_args

    with pytest.raises(ValueError, match="stop_at_exact_match.*1.5"):
        _args(tmp_path, stop_at_exact_match=1.5)
    with pytest.raises(ValueError, match="decode_stop_at_exact_match.*-0.1"):  # at parsing, before any model loads
        parse_args(["--output_dir", str(tmp_path), "--decode_stop_at_exact_match", "-0.1"])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n,rate", [(67, 0.025), (462, 0.025), (462, 0.01), (462, 0.05), (40, 0.0), (10, 0.5),
                                    (7, 1.0)])
def test_the_rejecting_level_lets_at_most_the_rate_through(n, rate, dtype):
    """The calibrated bound never rounds above the rate: numpy's "lower" 97.5% quantile of 67
    scores lets 3 through (4.5%); the level lets floor(rate * n) through, ties included, also
    when it meets float32 scores (as the engine's cosines are) that numpy compares in float32."""
    from memory.decoding_step import rejecting_level

    scores = np.round(np.random.default_rng(n).normal(0.6, 0.05, n), 2).astype(dtype)  # rounding makes ties
    level = rejecting_level(scores, rate)
    allowed = int(rate * n + 1e-9)
    passed = int((scores >= level).sum())
    assert passed <= allowed
    if allowed < n:  # the lowest such level: the score below it lets more than the rate through
        below = np.sort(scores)[::-1][allowed]
        assert below < level <= np.nextafter(below, np.array(np.inf, dtype)) and (scores >= below).sum() > allowed
    if rate == 0.025 and n == 67:
        assert (scores >= np.quantile(scores, 0.975, method="lower")).sum() > passed


def test_recall_threshold_is_auto_or_a_number(tmp_path):
    from memory.config import parse_args

    assert parse_args(["--output_dir", str(tmp_path)])[1].recall_threshold == "auto"
    assert parse_args(["--output_dir", str(tmp_path), "--recall_threshold", "0.35"])[1].recall_threshold == 0.35
    with pytest.raises(ValueError, match="recall_threshold.*'high'"):
        parse_args(["--output_dir", str(tmp_path), "--recall_threshold", "high"])


class _CountingSearch:
    def __init__(self, bank):
        self.bank, self.calls = bank, []

    def __call__(self, queries):
        self.calls.append(len(queries))
        return [[Hit(7, 0.9, "stored", self.bank[0])] for _ in queries]


def test_recall_loop_searches_exactly_when_recall_is_generated(tiny, monkeypatch):
    lm, tok, ids = tiny
    engine = RecallEngine(lm, tok, ids, MemoryProjector(64, 64, 1.0, 0))
    bank = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    # force the model's choices: recall at step 2, then </recall> after 3 memory tokens, then stop
    script = {1: ids[RECALL_TOKEN], 5: ids[RECALL_END_TOKEN], 7: tok.convert_tokens_to_ids("<|im_end|>")}
    step = {"n": 0}
    real_forward = engine._forward

    def scripted_forward(emb, mask, past, *rest):
        hidden, logits, past = real_forward(emb, mask, past, *rest)
        step["n"] += 1
        if step["n"] - 1 in script:
            logits = torch.full_like(logits, -1e9)
            logits[:, script[step["n"] - 1]] = 0
        else:
            logits[:, ids[RECALL_TOKEN]] = -1e9
            logits[:, ids[RECALL_END_TOKEN]] = -1e9
        return hidden, logits, past

    monkeypatch.setattr(engine, "_forward", scripted_forward)
    search = _CountingSearch(bank)
    [answer] = engine.generate(["hello"], search, recall="model", max_new_tokens=20, threshold=0.5)
    assert search.calls == [1]
    assert len(answer.recalls) == 1 and answer.recalls[0].memory_id == 7
    gen = tok(answer.text, add_special_tokens=False)["input_ids"]
    assert gen.count(ids[RECALL_TOKEN]) == 1 and gen.count(ids[MEMORY_PAD_TOKEN]) == 1

    # no <recall> generated: no search at all
    step["n"] = 0
    script.clear()
    search = _CountingSearch(bank)
    engine.generate(["hello"], search, recall="model", max_new_tokens=5)
    assert search.calls == []


def test_below_threshold_the_model_is_told_nothing_was_found(tiny):
    lm, tok, ids = tiny
    engine = RecallEngine(lm, tok, ids, MemoryProjector(64, 64, 1.0, 0))
    vec = np.ones(64, np.float32)
    [answer] = engine.generate(["hello"], lambda q: [[Hit(1, 0.1, "x", vec)]], force_recall=True,
                               max_new_tokens=12, threshold=0.5)
    assert answer.recalls[0].memory_id is None and "nothing found" in answer.recalls[0].decoded
    assert MEMORY_PAD_TOKEN not in answer.text and "nothing found" in answer.text


def test_follow_on_memories_are_injected_in_their_own_spans_without_a_new_search(tiny, monkeypatch):
    """memories_per_recall k: after the first memory's </recall>, the next hits of the same search
    above the threshold follow, each as a forced <recall> + its vector + the text the side pass
    decoded for it + </recall>; hits below the threshold never do, and nothing is searched again."""
    lm, tok, ids = tiny
    engine = RecallEngine(lm, tok, ids, MemoryProjector(64, 64, 1.0, 0))
    rng = np.random.default_rng(0)
    hits = [Hit(1, 0.9, "A", rng.standard_normal(64).astype(np.float32)),
            Hit(2, 0.8, "B", rng.standard_normal(64).astype(np.float32)),
            Hit(3, 0.7, "C", rng.standard_normal(64).astype(np.float32)),
            Hit(4, 0.3, "D", rng.standard_normal(64).astype(np.float32))]
    words = {2: tok("Paris", add_special_tokens=False)["input_ids"], 3: tok(" Lisbon", add_special_tokens=False)["input_ids"]}
    side = []

    def decode_follow_ons(contexts, follow):
        side.append((list(contexts), [h.memory_id for h in follow]))
        return [words[h.memory_id] for h in follow]

    injected = []
    real_embed, real_forward = engine._embed, engine._forward

    def spying_embed(ids_, vectors):
        injected.extend(vectors.values())
        return real_embed(ids_, vectors)

    state = {"forwards": -1}  # the probe's pass comes first

    def scripted_forward(emb, mask, past, *rest):  # the model closes its span at once, then ends
        hidden, logits, past = real_forward(emb, mask, past, *rest)
        logits = torch.full_like(logits, -1e9)
        logits[:, ids[RECALL_END_TOKEN] if state["forwards"] < 2 else tok.convert_tokens_to_ids("<|im_end|>")] = 0
        state["forwards"] += 1
        return hidden, logits, past

    monkeypatch.setattr(engine, "decode_follow_ons", decode_follow_ons)
    monkeypatch.setattr(engine, "_embed", spying_embed)
    monkeypatch.setattr(engine, "_forward", scripted_forward)
    calls = []

    def search(queries):
        calls.append(len(queries))
        return [list(hits) for _ in queries]

    [answer] = engine.generate(["hello"], search, force_recall=True, max_new_tokens=24, threshold=0.5,
                               memories_per_recall=4, verify=False)  # the side pass's own decodes
    assert calls == [1]
    prompt = engine.prompt_text("hello", force_recall=True)
    assert side == [([prompt, prompt], [2, 3])]  # both follow-ons decoded from the first memory's context
    assert [(r.memory_id, r.rank) for r in answer.recalls] == [(1, 1), (2, 2), (3, 3)]
    assert [r.decoded for r in answer.recalls] == ["", "Paris", "Lisbon"]
    assert len(injected) == 3 and all(torch.equal(v, torch.as_tensor(h.vector)) for v, h in zip(injected, hits))
    gen = answer.tokens
    first_end = gen.index(ids[RECALL_END_TOKEN])
    assert gen[first_end + 1:first_end + 3 + len(words[2])] == [ids[RECALL_TOKEN], ids[MEMORY_PAD_TOKEN], *words[2]]
    assert gen.count(ids[RECALL_TOKEN]) == 2 and gen.count(ids[MEMORY_PAD_TOKEN]) == 3
    assert answer.final == ""

    state["forwards"], injected[:], calls[:], side[:] = -1, [], [], []
    [answer] = engine.generate(["hello"], search, force_recall=True, max_new_tokens=12, threshold=0.5, verify=False)
    assert calls == [1] and side == [] and [r.memory_id for r in answer.recalls] == [1] and len(injected) == 1
    with pytest.raises(ValueError, match="memories_per_recall"):
        engine.generate(["hello"], search, memories_per_recall=0)


def test_no_repeat_ngram_stops_an_answer_loop_but_not_a_memory_span(tiny, monkeypatch):
    """With no_repeat_ngram n, the answer never repeats an n-gram of itself; the memory span is
    outside that rule (the answer may restate the memory, and the span may repeat the answer)."""
    lm, tok, ids = tiny
    engine = RecallEngine(lm, tok, ids, MemoryProjector(64, 64, 1.0, 0))
    loop = tok(" a b", add_special_tokens=False)["input_ids"]
    assert len(loop) == 2
    real_forward = engine._forward
    state = {"n": 0}

    def looping_forward(emb, mask, past, *rest):  # prefers " a b a b ...", then any other token
        hidden, logits, past = real_forward(emb, mask, past, *rest)
        logits = torch.zeros_like(logits)
        logits[:, loop[state["n"] % 2]] = 10.0
        logits[:, loop[(state["n"] + 1) % 2]] = 5.0
        logits[:, ids[RECALL_TOKEN]] = logits[:, ids[RECALL_END_TOKEN]] = -1e9
        state["n"] += 1
        return hidden, logits, past

    monkeypatch.setattr(engine, "_forward", looping_forward)
    no_search = lambda q: [[] for _ in q]  # noqa: E731
    [free] = engine.generate(["hello"], no_search, recall="model", max_new_tokens=12)
    assert free.tokens[:6] == loop * 3  # the loop, unguarded
    state["n"] = 0
    [guarded] = engine.generate(["hello"], no_search, recall="model", max_new_tokens=12, no_repeat_ngram=3)
    grams = [tuple(guarded.tokens[i:i + 3]) for i in range(len(guarded.tokens) - 2)]
    assert len(grams) == len(set(grams)) and guarded.tokens[:3] == [loop[0], loop[1], loop[0]]
    assert RecallEngine._repeats([1, 2, 3, 1, 2], 3) == [3] and RecallEngine._repeats([1, 2], 3) == []


def test_the_follow_on_side_pass_decodes_as_a_first_memory_would(tiny):
    """decode_follow_ons reads each vector after the given context exactly as the recall loop
    reads a first memory there (the setting step 2 trains)."""
    lm, tok, ids = tiny
    engine = RecallEngine(lm, tok, ids, MemoryProjector(64, 64, 1.0, 0))
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((2, 64)).astype(np.float32)
    context = "Where do I live?"
    expected = engine.decode_memories(vectors, context=context, max_new_tokens=6)
    got = engine.decode_follow_ons([engine.prompt_text(context, force_recall=True)] * 2,
                                   [Hit(i, 1.0, "", v) for i, v in enumerate(vectors)], max_new_tokens=6)
    assert [tok.decode(g).strip() for g in got] == [e.strip() for e in expected]
    assert all(len(g) > 0 for g in got) and ids[RECALL_END_TOKEN] not in sum(got, [])


def test_min_steps_gives_a_small_cycle_more_epochs_and_never_fewer(tmp_path):
    from memory.decoding_step import epochs_for_min_steps

    args = _args(tmp_path, per_device_train_batch_size=8, num_train_epochs=6, min_steps=120)
    assert epochs_for_min_steps(40, args) == 24  # 5 steps per epoch -> 24 epochs = 120 steps
    assert epochs_for_min_steps(41, args) == 20  # 6 steps per epoch
    assert epochs_for_min_steps(235, args) == 6  # 30 steps per epoch: the configured 6 already give 180
    args = _args(tmp_path, per_device_train_batch_size=8, num_train_epochs=6, min_steps=0)
    assert epochs_for_min_steps(8, args) == 6


def test_collator_rounds_the_width_up_when_asked(tiny):
    _, tok, ids = tiny
    builder = SampleBuilder(tok, FACTS, [["q?"]] * 3, SFT, max_length=128)
    samples = [builder.sft_sample(0), builder.memory_sample(2, 0)]
    plain = DecodingCollator(tok.pad_token_id, torch.randn(3, 64), ids[MEMORY_PAD_TOKEN])(samples)
    rounded = DecodingCollator(tok.pad_token_id, torch.randn(3, 64), ids[MEMORY_PAD_TOKEN],
                               pad_to_multiple_of=64)(samples)
    width = plain["input_ids"].shape[1]
    assert rounded["input_ids"].shape[1] == -(-width // 64) * 64 > width
    assert torch.equal(rounded["attention_mask"][:, :width], plain["attention_mask"])
    assert rounded["attention_mask"][:, width:].sum() == 0 and (rounded["labels"][:, width:] == IGNORE).all()


def test_naive_head_on_all_positions_gives_the_same_loss(tiny, tmp_path):
    """The benchmark's naive baseline (LM head on every position) computes the loss the
    default (head on labelled positions only) does, so its speed is compared like for like."""
    lm, tok, ids = tiny
    builder = SampleBuilder(tok, FACTS, [["q?"]] * 3, SFT, max_length=128)
    samples = [builder.sft_sample(0), builder.memory_sample(2, 0), builder.sandwich_sample(1, 1)]
    vectors = torch.randn(3, 64)
    losses = {}
    for naive in (False, True):
        model = build_decoder_model(copy.deepcopy(lm), ids, _args(tmp_path, head_on_all_positions=naive),
                                    memory_dim=64).eval()
        pad_to = 128 if naive else 1
        batch = DecodingCollator(tok.pad_token_id, vectors, ids[MEMORY_PAD_TOKEN], pad_to_multiple_of=pad_to)(samples)
        assert (batch["input_ids"].shape[1] == 128) == naive
        losses[naive] = model(**batch)["lm"]
    assert torch.allclose(losses[False], losses[True], atol=1e-5)


def test_a_forced_recall_span_is_not_part_of_the_final_answer(tiny, monkeypatch):
    """--force-recall puts <recall> in the prompt: what follows up to </recall> (the memory, or
    'nothing found') is the recall span, not the answer."""
    lm, tok, ids = tiny
    engine = RecallEngine(lm, tok, ids, MemoryProjector(64, 64, 1.0, 0))
    vec = np.ones(64, np.float32)
    word = tok("Paris", add_special_tokens=False)["input_ids"][0]
    answer_word = tok(" Lisbon", add_special_tokens=False)["input_ids"][0]
    script = {1: word, 2: ids[RECALL_END_TOKEN], 3: answer_word, 4: tok.convert_tokens_to_ids("<|im_end|>")}
    step = {"n": -1}  # the probe's pass comes first
    real_forward = engine._forward

    def scripted_forward(emb, mask, past, *rest):
        hidden, logits, past = real_forward(emb, mask, past, *rest)
        logits = torch.full_like(logits, -1e9)
        logits[:, script.get(step["n"], ids[RECALL_END_TOKEN])] = 0
        step["n"] += 1
        return hidden, logits, past

    monkeypatch.setattr(engine, "_forward", scripted_forward)
    [answer] = engine.generate(["hello"], lambda q: [[Hit(1, 0.9, "Paris", vec)]], force_recall=True,
                               max_new_tokens=8, threshold=0.5)
    assert answer.recalls[0].decoded == "Paris"
    assert answer.final == "Lisbon"
    step["n"] = 1  # the probe's pass, then nothing found: the span is the notice, then the answer
    [answer] = engine.generate(["hello"], lambda q: [[Hit(1, 0.1, "Paris", vec)]], force_recall=True,
                               max_new_tokens=12, threshold=0.5)
    assert "nothing found" not in answer.final


def test_length_grouped_epochs_keep_the_samples_and_cut_padding(tiny, tmp_path):
    """``length_grouped``: the same samples each epoch, laid out in batches of similar length
    (shuffled at the batch level, a partial batch last), read in order by the trainer."""
    _, tok, ids = tiny
    facts = [f"The user has {n} {'very ' * (n % 7)}old books about {'the sea ' * (n % 5)}." for n in range(23)]
    builder = SampleBuilder(tok, facts, [[f"q{n}?"] for n in range(23)], SFT, max_length=128)
    plain = ResampledDataset(builder.epoch, seed=3)
    grouped = ResampledDataset(builder.epoch, seed=3, group=4)
    key = lambda x: (tuple(x["input_ids"]), x.get("memory_row", -1))  # noqa: E731
    for epoch in (0, 1):
        if epoch:
            plain.resample(epoch)
            grouped.resample(epoch)
        assert sorted(map(key, plain.items)) == sorted(map(key, grouped.items))

        def padded(items):
            return sum(4 * max(len(x["input_ids"]) for x in items[i:i + 4]) for i in range(0, len(items), 4))
        assert padded(grouped.items) < padded(plain.items)
    assert len(grouped.items) % 4 != 0  # the partial batch exists and is last
    first_epoch = [len(x["input_ids"]) for x in grouped.items[:4]]
    assert max(first_epoch) - min(first_epoch) <= max(len(x["input_ids"]) for x in grouped.items) // 2
    trainer = EnhancedTextMemoryTrainer(build_decoder_model(make_tiny_model(tok), ids, _args(tmp_path), 64),
                                        _args(tmp_path), torch.randn(23, 64), tok, grouped)
    assert isinstance(trainer._get_train_sampler(), torch.utils.data.SequentialSampler)


def test_data_loader_workers_train_on_each_epochs_fresh_draw(tiny, tmp_path):
    """``dataloader_num_workers`` (collation ahead of the step, in worker processes): the
    samples are redrawn in the training process at each epoch's start, and the workers, started
    afresh each epoch, serve that draw; persistent workers, which would keep the first draw, are
    refused."""
    lm, tok, ids = tiny
    contexts = [[f"Question {k} about fact {r}?" for k in range(6)] for r in range(len(FACTS))]
    builder = SampleBuilder(tok, FACTS, contexts, SFT, max_length=128, mix="2:1:1")
    dataset = ResampledDataset(builder.epoch, seed=5)
    args = _args(tmp_path, num_train_epochs=2, dataloader_num_workers=1, stop_at_exact_match=0.0)
    model = build_decoder_model(lm, ids, args, memory_dim=64)
    seen = []
    forward = model.forward

    def recording(input_ids, attention_mask, labels, **kw):
        seen.append([tuple(row[mask.bool()].tolist()) for row, mask in zip(input_ids, attention_mask)])
        return forward(input_ids, attention_mask, labels, **kw)

    model.forward = recording
    trainer = EnhancedTextMemoryTrainer(model, args, torch.randn(len(FACTS), 64), tok, dataset)
    trainer.train()
    per_epoch = len(dataset) // 3
    assert len(dataset) % 3 == 0 and len(seen) == 2 * per_epoch
    expected = ResampledDataset(builder.epoch, seed=5)
    for epoch in (0, 1):
        if epoch:
            expected.resample(epoch)
        drawn = sorted(tuple(x["input_ids"]) for x in expected.items)
        assert sorted(s for batch in seen[epoch * per_epoch:(epoch + 1) * per_epoch] for s in batch) == drawn
    assert sorted(s for b in seen[:per_epoch] for s in b) != sorted(s for b in seen[per_epoch:] for s in b)
    with pytest.raises(ValueError, match="persistent"):
        _args(tmp_path, dataloader_num_workers=1, dataloader_persistent_workers=True)


def test_decode_noise_reaches_step2_and_zero_injects_the_stored_vector(tmp_path):
    """``--decode_noise_std`` reaches step 2's arguments and a negative one is refused at parsing;
    with 0 the projector injects the same embedding every time in training, with noise it does not."""
    import torch

    from memory.config import parse_args
    from memory.training_service import MemoryTrainingService
    from recall.text_memory_train import MemoryProjector

    with pytest.raises(ValueError, match="decode_noise_std.*-0.1"):
        parse_args(["--output_dir", str(tmp_path), "--decode_noise_std", "-0.1"])
    service = MemoryTrainingService(*parse_args(["--output_dir", str(tmp_path / "w"), "--decode_noise_std", "0.02",
                                                 "--chats_dir", "", "--use_cpu"]))
    assert service.decoding_arguments(tmp_path / "d").noise_std == 0.02
    projector = MemoryProjector(8, 8, embed_norm=1.0, mlp_hidden=0)
    vectors = torch.randn(3, 8)
    assert torch.equal(projector(vectors, 0.0), projector(vectors, 0.0))
    assert not torch.allclose(projector(vectors, 0.02), projector(vectors, 0.0))
