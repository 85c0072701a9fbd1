"""Step 1 (RecallMemoryTrainer) on the tiny model."""
import copy

import pytest
import torch

from memory.token_manager import RECALL_TOKEN, add_memory_tokens
from recall.text_embedding_train import (RecallCollator, RecallMemoryTrainer, RecallTrainingArguments,
                                         build_recall_model, format_query, retrieval_metrics)
from tests.conftest import make_tiny_model

FACTS = ["The user lives in Porto.", "The user has a dog called Max.", "The user works as a nurse.",
         "The user is allergic to peanuts.", "The user plays the guitar."]


def _tiny(tokenizer):
    """A tiny model with the memory tokens, and a random 64-d bank for FACTS."""
    tok = copy.deepcopy(tokenizer)
    lm = make_tiny_model(tok)
    ids = add_memory_tokens(lm, tok)
    torch.manual_seed(1)
    return tok, lm, ids, torch.nn.functional.normalize(torch.randn(len(FACTS), 64), dim=-1)


@pytest.fixture
def setup(tokenizer, tmp_path):
    tok, lm, ids, bank = _tiny(tokenizer)
    data = [{"text": format_query(tok, f), "target": i} for i, f in enumerate(FACTS)] * 4
    args = RecallTrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=5,
                                   num_train_epochs=6, learning_rate=5e-3, logging_steps=1, save_strategy="no",
                                   lora_r=4, lora_alpha=8, use_cpu=True, seed=0, temperature=0.05,
                                   lora_target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    model = build_recall_model(lm, tok, args, memory_dim=64, token_ids=list(ids.values()))
    trainer = RecallMemoryTrainer(model=model, args=args, memory_bank=bank, tokenizer=tok,
                                  recall_token_id=ids[RECALL_TOKEN], train_dataset=data, eval_dataset=data[:5])
    return trainer, tok, ids


def test_loss_decreases_rows_change_and_retrieval_improves(setup):
    trainer, tok, ids = setup
    rows_before = trainer.model.token_rows.delta.detach().clone()
    before = trainer.evaluate()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] * 0.7
    assert not torch.equal(rows_before, trainer.model.token_rows.delta.detach())
    assert trainer.model.token_rows.delta.dtype == torch.float32
    after = trainer.evaluate()
    assert after["eval_recall_at_1"] > before["eval_recall_at_1"] and after["eval_recall_at_1"] >= 0.8


def test_evaluate_ranks_a_cue_among_its_own_users_memories(setup, tmp_path):
    trainer, tok, ids = setup
    text = format_query(tok, FACTS[0])
    query = trainer.query_vectors([text])
    bank = torch.cat([trainer.memory_bank, torch.nn.functional.normalize(query, dim=-1)])  # another user's copy
    cue = [{"text": text, "target": 0, "user": "alex"}]
    scoped = RecallMemoryTrainer(model=trainer.model, args=trainer.args, memory_bank=bank, tokenizer=tok,
                                 recall_token_id=ids[RECALL_TOKEN], bank_users=["alex"] * len(FACTS) + ["sam"])
    unscoped = RecallMemoryTrainer(model=trainer.model, args=trainer.args, memory_bank=bank, tokenizer=tok,
                                   recall_token_id=ids[RECALL_TOKEN])
    assert unscoped.evaluate(cue)["eval_recall_at_1"] == 0.0  # sam's memory is the query itself
    assert scoped.evaluate(cue)["eval_mrr"] > unscoped.evaluate(cue)["eval_mrr"]
    assert scoped.evaluate(cue + [{**cue[0], "target": len(FACTS), "user": "sam", "positives": [len(FACTS)]}])[
        "eval_recall_at_1"] >= 0.5  # the same text from sam finds sam's memory
    with pytest.raises(ValueError, match="bank_users"):
        RecallMemoryTrainer(model=trainer.model, args=trainer.args, memory_bank=bank, tokenizer=tok,
                            recall_token_id=ids[RECALL_TOKEN], bank_users=["alex"])


def test_collator_keeps_the_tokens_next_to_recall(tokenizer):
    tok = copy.deepcopy(tokenizer)
    rid = add_memory_tokens(make_tiny_model(tok), tok)[RECALL_TOKEN]
    collate = RecallCollator(tok, rid, max_length=8)
    long_text = " ".join(f"word{i}" for i in range(50)) + " END" + RECALL_TOKEN
    batch = collate([{"text": long_text, "target": 0}, {"text": "short" + RECALL_TOKEN, "target": 1}])
    assert batch["input_ids"].shape[1] == 8
    assert batch["input_ids"][0, -1].item() == rid
    assert "END" in tok.decode(batch["input_ids"][0])
    last = batch["attention_mask"][1].sum().item() - 1
    assert batch["input_ids"][1, last].item() == rid and batch["targets"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="does not end with"):
        collate([{"text": "no recall token", "target": 0}])


def test_query_vector_is_read_at_recall_under_both_paddings(setup):
    trainer, tok, ids = setup
    texts = [format_query(tok, FACTS[0]), format_query(tok, "A much longer context about many things " * 3)]
    right = trainer.query_vectors(texts)
    alone = trainer.query_vectors(texts[:1])
    assert torch.allclose(right[0], alone[0], atol=1e-5)
    model = trainer.model
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt", padding_side="left")
    with torch.no_grad():
        left = model(enc["input_ids"], enc["attention_mask"])
    assert torch.allclose(left[0], alone[0], atol=1e-4)


def test_retrieval_metrics():
    m = retrieval_metrics([1, 2, 6, 1])
    assert m["recall_at_1"] == 0.5 and m["recall_at_5"] == 0.75 and abs(m["mrr"] - (1 + 0.5 + 1 / 6 + 1) / 4) < 1e-9


def test_abstain_class_in_the_loss():
    from recall.text_embedding_train import MemoryBankInfoNCE

    loss_fn = MemoryBankInfoNCE()
    bank = torch.eye(3, 4)
    queries = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1, 0, 0], [0, 0, 0, 1.0]]), dim=-1)
    scale = torch.tensor([0.0])  # T = 1
    level = torch.tensor([0.5], requires_grad=True)
    # the second text answers no memory: its target is the extra class (row 3), scored at the level
    loss = loss_fn(queries, bank, torch.tensor([0, 3]), scale, abstain=level)
    scores = torch.cat([queries @ bank.T, level.expand(2, 1)], dim=1)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(scores, torch.tensor([0, 3])))
    loss.backward()
    assert level.grad is not None and level.grad.item() != 0
    # a teacher over the bank gets no mass on the extra class
    teacher = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    kl_loss = loss_fn(queries, bank, torch.tensor([-1, -1]), scale, teacher=teacher, abstain=level.detach())
    expected = torch.nn.functional.kl_div(torch.log_softmax(scores.detach(), -1),
                                          torch.nn.functional.pad(teacher, (0, 1)), reduction="batchmean")
    assert torch.allclose(kl_loss, expected)


def test_abstention_learns_a_level_between_cues_and_general_prompts(tokenizer, tmp_path):
    tok, lm, ids, bank = _tiny(tokenizer)
    general = ["What is the capital of France?", "Write a haiku about rain.", "How do magnets work?",
               "Explain photosynthesis simply.", "Give me a pasta recipe."]
    data = ([{"text": format_query(tok, f), "target": i} for i, f in enumerate(FACTS)]
            + [{"text": format_query(tok, g), "target": len(FACTS)} for g in general]) * 4
    args = RecallTrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=10,
                                   num_train_epochs=8, learning_rate=5e-3, logging_steps=1, save_strategy="no",
                                   lora_r=4, lora_alpha=8, use_cpu=True, seed=0, temperature=0.05, abstention=True)
    model = build_recall_model(lm, tok, args, memory_dim=64, token_ids=list(ids.values()))
    assert model.abstain is not None and "abstain" in model.trainable_keys()
    trainer = RecallMemoryTrainer(model=model, args=args, memory_bank=bank, tokenizer=tok,
                                  recall_token_id=ids[RECALL_TOKEN], train_dataset=data, eval_dataset=data)
    trainer.train()
    level = float(model.abstain.detach())
    cue_best = (trainer.query_vectors([format_query(tok, f) for f in FACTS]) @ bank.T).max(1).values
    general_best = (trainer.query_vectors([format_query(tok, g) for g in general]) @ bank.T).max(1).values
    assert (cue_best > level).float().mean() >= 0.8 and (general_best < level).float().mean() >= 0.8
    metrics = trainer.evaluate()  # "no memory" texts are not retrieval cues; a repeated text counts once
    assert metrics["eval_n"] == len(FACTS) and metrics["eval_strict_n"] == len(FACTS) * 4
    state = model.trainable_state()
    assert "abstain" in state
    # a model built without abstention (step 2, the published loader) loads that state, ignoring the level
    plain = build_recall_model(make_tiny_model(tok), tok, RecallTrainingArguments(
        output_dir=str(tmp_path / "p"), lora_r=4, lora_alpha=8, use_cpu=True), 64, list(ids.values()))
    plain.load_trainable_state(state)
