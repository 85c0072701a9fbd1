"""Step 1's vector distillation: the <recall> query learns a sentence encoder's vectors on any
text (no label needed), when the memory vectors come from that encoder."""
import json

import torch
import torch.nn.functional as F

import run_training
from recall.text_embedding_train import RecallCollator, vector_distillation

FACTS = ["The user lives in Porto.", "The user has a dog called Max.", "The user works as a nurse."]


def test_the_term_is_small_at_the_teacher_and_pulls_queries_to_it():
    torch.manual_seed(0)
    teacher = F.normalize(torch.randn(8, 32), dim=-1)
    assert vector_distillation(teacher, teacher, 0.05) < 1e-3
    query = torch.randn(8, 32, requires_grad=True)
    opt = torch.optim.Adam([query], lr=0.05)
    start = float(vector_distillation(F.normalize(query, dim=-1), teacher, 0.05))
    for _ in range(200):
        opt.zero_grad()
        vector_distillation(F.normalize(query, dim=-1), teacher, 0.05).backward()
        opt.step()
    cos = (F.normalize(query, dim=-1) * teacher).sum(-1)
    assert float(vector_distillation(F.normalize(query, dim=-1), teacher, 0.05)) < start / 10
    assert cos.min() > 0.7 and cos.mean() > 0.85  # from about 0 (random directions in 32-d)


def test_the_collator_stacks_teacher_vectors(tokenizer):
    from memory.token_manager import RECALL_TOKEN

    tok = tokenizer
    if RECALL_TOKEN not in tok.get_vocab():
        import copy

        tok = copy.deepcopy(tokenizer)
        tok.add_special_tokens({"additional_special_tokens": [RECALL_TOKEN]})
    rid = tok.convert_tokens_to_ids(RECALL_TOKEN)
    feats = [{"text": f"hello {RECALL_TOKEN}", "target": -1, "teacher_vector": [1.0, 0.0]},
             {"text": f"where do I live? {RECALL_TOKEN}", "target": 0, "teacher_vector": [0.0, 1.0]}]
    batch = RecallCollator(tok, rid, 32)(feats)
    assert batch["teacher_vectors"].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert "teacher_vectors" not in RecallCollator(tok, rid, 32)([{k: v for k, v in f.items() if k != "teacher_vector"}
                                                                 for f in feats])


def _run(tiny_model_dir, tmp_path, *extra):
    mem = tmp_path / "m.jsonl"
    mem.write_text("".join(json.dumps({"text": t, "user_id": "alex"}) + "\n" for t in FACTS))
    return run_training.main(["--model_name_or_path", str(tiny_model_dir), "--chats_dir", "", "--precision", "fp32",
                              "--output_dir", str(tmp_path / "out"), "--num_train_epochs", "1",
                              "--per_device_train_batch_size", "8", "--lora_r", "4", "--cue_questions", "0",
                              "--memories", str(mem), *extra])


def test_minilm_memory_vectors_train_with_distillation_then_decode_and_publish(tiny_model_dir, tmp_path):
    """Steps 3.1, 3.2 and 4 with memory vectors of another width than the model's (MiniLM: 384):
    step 2 measures and preserves step 1's query through its projector."""
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                           for p, c in [("Say hi.", "Hi there!"), ("Name a colour.", "Blue.")]))
    code = _run(tiny_model_dir, tmp_path, "--embedding_model", "minilm", "--vector_distill_weight", "1",
                "--recall_general_prompts", "true", "--stage", "all", "--sft_data", str(sft),
                "--sft_self_distill", "false", "--decode_epochs", "1", "--decode_min_steps", "0", "--decode_lora_r", "4",
                "--decode_projector_hidden", "32", "--disable_tqdm", "true")
    assert code == 0
    [run] = sorted((tmp_path / "out" / "runs").iterdir())
    metrics = json.loads((run / "recall" / "metrics.json").read_text())
    assert metrics["unlabelled_texts"] >= 100  # the bundled prompts joined the (empty) chats' turns
    assert metrics["final_train_set"]["n"] == metrics["cues"] > 0
    decode = json.loads((run / "decode" / "metrics.json").read_text())
    assert decode["recall_before"]["n"] > 0 and 0 <= decode["recall_after"]["recall_at_1"] <= 1
    assert (tmp_path / "out" / "models" / "current").exists()


def test_distillation_into_another_encoders_space_is_refused(tiny_model_dir, tmp_path, capsys):
    code = _run(tiny_model_dir, tmp_path, "--vector_distill_weight", "1", "--stage", "recall")  # chat-model vectors
    assert code != 0
    captured = capsys.readouterr()
    assert "vector_distill_weight" in captured.out + captured.err and "embedding_model" in captured.out + captured.err
