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


@pytest.fixture
def setup(tokenizer, tmp_path):
    tok = copy.deepcopy(tokenizer)
    lm = make_tiny_model(tok)
    ids = add_memory_tokens(lm, tok)
    torch.manual_seed(1)
    bank = torch.nn.functional.normalize(torch.randn(len(FACTS), 64), dim=-1)
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
