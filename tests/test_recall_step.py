"""Step 3.1 through run_training.py on the tiny model: import, cues, K-fold, saved adapter."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import run_training
from memory.chat_store import ChatFormatError
from memory.cues import Cue, is_good_question
from memory.import_memories import read_memories_jsonl
from memory.vector_db import MemoryVectorDB
from recall.kfold import ALWAYS_TRAIN, holdout_memories, stratified_folds, with_positives
from recall.text_embedding_train import positive_ranks

FACTS = ["The user lives in Porto.", "The user has a dog called Max.", "The user works as a nurse."]


def _jsonl(path: Path, lines):
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return path


def test_stratified_folds_are_disjoint_and_keep_every_memory_in_training():
    targets = [m for m in range(7) for _ in range(6)]
    kinds = ["text", "source", "question", "question", "question", "question"] * 7
    folds = stratified_folds(targets, kinds, k=5, seed=3)
    assert all(f == ALWAYS_TRAIN for f, k in zip(folds, kinds) if k == "text")
    for fold in range(5):
        held = {i for i, f in enumerate(folds) if f == fold}
        train = {i for i, f in enumerate(folds) if f != fold}
        assert held and not held & train
        assert {targets[i] for i in train} == set(range(7))  # each memory keeps cues in training
    sizes = [folds.count(f) for f in range(5)]
    assert max(sizes) - min(sizes) <= 7  # balanced: at most one cue per memory apart
    assert holdout_memories(targets, 0.3, seed=1) == holdout_memories(targets, 0.3, seed=1)
    with pytest.raises(ValueError):
        stratified_folds(targets, kinds, k=1)


def test_a_text_shared_by_two_memories_is_held_out_once_and_either_memory_is_right():
    # memories 0 and 1 come from one message that states both facts: its copies share a fold
    texts = ["m0", "I live with Tiago. Our flat is on the ground floor.", "Who do I live with?",
             "m1", "i live with tiago.  our flat is on the ground floor.", "Which floor is my flat on?",
             "m2", "I have a dog.", "M0"]
    targets = [0, 0, 0, 1, 1, 1, 2, 2, 1]
    kinds = ["text", "source", "template", "text", "source", "template", "text", "source", "template"]
    for seed in range(20):
        folds = stratified_folds(targets, kinds, k=3, seed=seed, texts=texts)
        assert folds[1] == folds[4] != ALWAYS_TRAIN
        assert folds[8] == ALWAYS_TRAIN  # the copy of memory 0's always-trained text is never held out
    data = [{"text": t, "raw": t, "target": m} for t, m in zip(texts, targets)] + [
        {"text": "hello", "raw": "hello", "target": 3}, {"text": "chat", "raw": "chat", "target": -1}]
    with_positives(data, 3)
    assert data[1]["positives"] == data[4]["positives"] == [0, 1]
    assert data[0]["positives"] == [0, 1] and data[2]["positives"] == [0]  # "m0" is also a cue of memory 1
    assert "positives" not in data[9] and "positives" not in data[10]  # "no memory" and unlabelled texts


def test_positive_ranks_count_only_wrong_memories_above_the_best_right_one():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1],
                           [0.9, 0.8, 0.7, 0.1],
                           [0.2, 0.9, 0.95, 0.1]])
    assert positive_ranks(scores, [[0], [2], [0, 3]]) == [1, 3, 3]
    assert positive_ranks(scores, [[1, 2], [1], [1, 2]]) == [2, 2, 1]


def test_import_counts(tiny_model_dir, tmp_path, capsys):
    mem = _jsonl(tmp_path / "m.jsonl", [{"text": t, "user_id": "alex"} for t in FACTS])
    assert _run(tiny_model_dir, tmp_path, "--memories", str(mem), "--stage", "extract") == 0
    assert "3 imported" in capsys.readouterr().out


def test_memories_jsonl_errors_name_file_and_line(tmp_path):
    good = _jsonl(tmp_path / "m.jsonl", [{"text": "The user likes tea.", "user_id": "u"}, "", {"text": "x y z"}])
    assert [c.user_id for c in read_memories_jsonl(good)] == ["u", "default"]
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "{not json"])
    with pytest.raises(ChatFormatError, match="bad.jsonl:2"):
        read_memories_jsonl(bad)
    with pytest.raises(ChatFormatError, match="bad2.jsonl:1: text"):
        read_memories_jsonl(_jsonl(tmp_path / "bad2.jsonl", [{"text": ""}]))


def test_memories_jsonl_source_fields_go_together_and_are_checked(tmp_path):
    ok = _jsonl(tmp_path / "src.jsonl", [{"text": "The user lives in Porto.", "session_id": "s-1", "message_index": 2},
                                         {"text": "The user has a dog."}])
    first, second = read_memories_jsonl(ok)
    assert (first.session_id, first.message_index) == ("s-1", 2)
    assert (second.session_id, second.message_index) == (None, None)
    exported = _jsonl(tmp_path / "export.jsonl", [{  # one line as `python -m memory export` writes it
        "id": 4, "user_id": "alex", "status": "active", "text": "The user lives in Porto.", "source": "extraction",
        "session_id": "s-1", "message_index": 2, "said_at": "2026-05-09T10:00:00+00:00",
        "created_at": "2026-06-01T08:00:00+00:00", "superseded_by": None}])
    (back,) = read_memories_jsonl(exported)
    assert (back.session_id, back.message_index, back.timestamp[:10]) == ("s-1", 2, "2026-05-09")
    for line, field in [({"text": "t", "session_id": "s-1"}, "message_index"),
                        ({"text": "t", "message_index": 0}, "session_id"),
                        ({"text": "t", "session_id": "../x", "message_index": 0}, "session_id"),
                        ({"text": "t", "session_id": 7, "message_index": 0}, "session_id"),
                        ({"text": "t", "session_id": "s", "message_index": -1}, "message_index"),
                        ({"text": "t", "session_id": "s", "message_index": True}, "message_index"),
                        ({"text": "t", "session_id": "s", "message_index": "3"}, "message_index")]:
        with pytest.raises(ChatFormatError, match=f"bad.jsonl:2: {field}"):
            read_memories_jsonl(_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, line]))


def test_imported_memory_with_a_source_gets_its_chat_message_as_a_cue(tiny_model_dir, tmp_path, caplog):
    from memory.config import MemoryArguments, ModelArguments
    from memory.cues import ensure_cues, memory_cues
    from memory.training_service import MemoryTrainingService
    from recall.text_embedding_train import RecallTrainingArguments

    chats = tmp_path / "chats"
    chats.mkdir()
    said = "Big news: I moved to Porto two weeks ago!"
    (chats / "s-1.json").write_text(json.dumps({"session_id": "s-1", "user_id": "alex", "messages": [
        {"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": said}]}))
    mem = _jsonl(tmp_path / "m.jsonl", [{"text": FACTS[0], "user_id": "alex", "session_id": "s-1", "message_index": 2},
                                        {"text": FACTS[1], "user_id": "alex", "session_id": "gone", "message_index": 0},
                                        {"text": FACTS[2], "user_id": "alex", "session_id": "s-1", "message_index": 9}])
    service = MemoryTrainingService(ModelArguments(model_name_or_path=str(tiny_model_dir), precision="fp32"),
                                    MemoryArguments(chats_dir=str(chats)),
                                    RecallTrainingArguments(output_dir=str(tmp_path / "out")))
    try:
        service.import_memories(str(mem))
        assert "m.jsonl: 1 of the sessions named by session_id are not in the chat store" in caplog.text
        assert "gone" in caplog.text
        records = service.db.records()
        assert {(r.session_id, r.message_index) for r in records} == {("s-1", 2), ("gone", 0), ("s-1", 9)}
        ensure_cues(service.db, records, None, None, service.store, n_questions=0)
        cues = {r.text: c for r, c in zip(records, memory_cues([service.db.get(r.id) for r in records],
                                                                  templates=False).values())}
    finally:
        service.close()
    assert cues[FACTS[0]] == [Cue("text", FACTS[0]), Cue("source", said)]
    assert cues[FACTS[1]] == [Cue("text", FACTS[1])]  # a session the store lacks gives no cue
    assert cues[FACTS[2]] == [Cue("text", FACTS[2])]  # nor does an index past the session's end


def test_question_filter():
    assert is_good_question("Where do I live?", "The user lives in Porto.")
    assert not is_good_question("Where does the user live?", "x")
    assert not is_good_question("Porto.", "x")
    assert Cue.decode(Cue("source", "I live in Porto.").encode()) == Cue("source", "I live in Porto.")


def _run(tiny_model_dir, tmp_path, *extra):
    return run_training.main(["--model_name_or_path", str(tiny_model_dir), "--chats_dir", "", "--precision", "fp32",
                              "--output_dir", str(tmp_path / "out"), "--num_train_epochs", "2",
                              "--per_device_train_batch_size", "4", "--lora_r", "4", "--cue_questions", "2",
                              "--cue_templates", "false", *extra])  # cue counts below: stored cues only


def test_import_then_train_recall_with_kfold(tiny_model_dir, tmp_path, capsys):
    mem = _jsonl(tmp_path / "m.jsonl", [{"text": t, "user_id": "alex"} for t in FACTS])
    assert _run(tiny_model_dir, tmp_path, "--memories", str(mem), "--stage", "extract") == 0
    questions = {"Porto": "Where do I live?", "Max": "What is my dog called?", "nurse": "What is my job?"}
    with MemoryVectorDB(tmp_path / "out" / "memory_db") as db:  # cues as the base model would write them
        for rec in db.records():
            q = next(v for k, v in questions.items() if k in rec.text)
            db.set_cues(rec.id, [Cue("question", q).encode(), Cue("question", q.replace("?", " again?")).encode()])
    code = _run(tiny_model_dir, tmp_path, "--memories", str(mem), "--stage", "recall", "--k_folds", "2")
    out = capsys.readouterr().out
    assert code == 0, out
    assert "<recall> training: 3 memories, 9 cues; 2-fold held-out recall@1" in out
    runs = sorted((tmp_path / "out" / "runs").iterdir())
    final = runs[-1] / "recall"
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["memories"] == 3 and metrics["cues"] == 9
    kf = metrics["kfold"]
    assert len(kf["per_fold"]) == 2 and 0 <= kf["recall_at_1_mean"] <= 1 and "strict_recall_at_1_mean" in kf
    missed = sum(round((1 - f["recall_at_1"]) * f["n"]) for f in kf["per_fold"])
    assert len(kf.get("misses", [])) == missed  # every missed held-out cue is listed, with memory texts
    assert all(set(m["expected"]) <= set(FACTS) and m["top"] in FACTS and m["rank"] > 1 for m in kf.get("misses", []))
    state = load_file(final / "recall_state.safetensors")
    delta = [v for k, v in state.items() if k.endswith(".delta")]
    assert delta and delta[0].dtype == torch.float32 and delta[0].abs().sum() > 0  # the rows trained
    assert any("lora_A" in k for k in state) and any("lora_B" in k and v.abs().sum() > 0 for k, v in state.items())
    with MemoryVectorDB(tmp_path / "out" / "memory_db") as db:
        cues_before = {r.id: r.cues for r in db.records()}
    assert all(cues_before.values())  # stored with the memory
    # rerun: the same statements are already stored (not stored twice); cues are reused, not regenerated
    code = _run(tiny_model_dir, tmp_path, "--memories", str(mem), "--stage", "recall", "--k_folds", "0")
    assert code == 0 and "0 added" in (out := capsys.readouterr().out) and "3 stored before" in out
    with MemoryVectorDB(tmp_path / "out" / "memory_db") as db:
        assert {r.id: r.cues for r in db.records()} == cues_before


def test_zero_memories_skips_training_with_a_message(tiny_model_dir, tmp_path, capsys, caplog):
    code = _run(tiny_model_dir, tmp_path, "--stage", "recall")
    assert code == 0
    assert "no memories" in caplog.text
    assert not (tmp_path / "out" / "runs").exists()


def test_evaluate_harness_reports_trained_and_baselines(tiny_model_dir, tmp_path, capsys):
    import evaluate

    mem = _jsonl(tmp_path / "m.jsonl", [{"text": t, "user_id": "alex"} for t in FACTS])
    assert _run(tiny_model_dir, tmp_path, "--memories", str(mem), "--stage", "recall", "--k_folds", "0") == 0
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps([{"question": "Where do I live?", "expected": "porto", "user_id": "alex"},
                                     {"question": "What's my dog's name?", "expected": "max", "user_id": "alex"}]))
    report = tmp_path / "report.json"
    capsys.readouterr()
    assert evaluate.main(["--output_dir", str(tmp_path / "out"), "--questions", str(questions),
                          "--report", str(report), "--precision", "fp32"]) == 0
    table = capsys.readouterr().out
    assert "| trained_recall |" in table and "| minilm_rag |" in table and "| untrained_last_token |" in table
    data = json.loads(report.read_text())
    assert data["minilm_rag"]["recall_at_1"] == 1.0  # MiniLM gets these two easy questions right
    assert len(data["trained_recall"]["per_question"]) == 2


def test_evaluate_errors(tmp_path, capsys):
    import evaluate

    assert evaluate.main(["--output_dir", str(tmp_path), "--questions", str(tmp_path / "q.json")]) == 1
    assert "no trained state" in capsys.readouterr().err
    bad = tmp_path / "q.json"
    bad.write_text(json.dumps([{"question": "hi"}]))
    from memory.evaluation import QuestionsFormatError, load_questions
    with pytest.raises(QuestionsFormatError, match=r"\[0\]\.expected"):
        load_questions(bad)


def test_unseen_memories_are_held_out_of_training_but_searched(tiny_model_dir, tmp_path, capsys):
    mem = _jsonl(tmp_path / "m.jsonl", [{"text": t, "user_id": "alex"} for t in FACTS])
    assert _run(tiny_model_dir, tmp_path, "--memories", str(mem), "--stage", "extract") == 0
    with MemoryVectorDB(tmp_path / "out" / "memory_db") as db:
        for rec in db.records():
            db.set_cues(rec.id, [Cue("question", f"Tell me fact {rec.id}?").encode()])
    code = _run(tiny_model_dir, tmp_path, "--memories", str(mem), "--stage", "recall", "--k_folds", "0",
                "--eval_unseen_fraction", "0.34")
    assert code == 0 and "unseen memories recall@1" in capsys.readouterr().out
    metrics = json.loads(next((tmp_path / "out" / "runs").glob("*/recall/metrics.json")).read_text())
    assert metrics["unseen"]["n"] == 2  # one memory held out: its text and its question


def test_a_reloaded_adapter_gives_the_query_vectors_it_was_trained_to_give(tiny_model_dir, tmp_path):
    """The saved state must hold everything: LoRA, delta *and* the base rows it was added to."""
    from memory.vector_db import MemoryVectorDB as _DB
    from recall.text_embedding_train import format_query, load_recall_model

    mem = _jsonl(tmp_path / "m.jsonl", [{"text": t, "user_id": "alex"} for t in FACTS])
    assert _run(tiny_model_dir, tmp_path, "--memories", str(mem), "--stage", "recall", "--k_folds", "0") == 0
    final = next((tmp_path / "out" / "runs").glob("*/recall"))
    model, tok, loaded, _ = load_recall_model(final, device="cpu", precision="fp32")
    with _DB(tmp_path / "out" / "memory_db") as db:
        records = db.records()
        keys = torch.from_numpy(db.vectors([r.id for r in records]))
    enc = tok([format_query(tok, r.text) for r in records], add_special_tokens=False, padding=True,
              return_tensors="pt")
    with torch.no_grad():
        scores = model(enc["input_ids"], enc["attention_mask"]) @ keys.T
    reloaded_at_1 = (scores.argmax(1) == torch.arange(len(records))).float().mean().item()
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["cues"] == len(records)  # only the memory texts: the same queries as above
    assert abs(reloaded_at_1 - metrics["final_train_set"]["recall_at_1"]) < 1e-6
    # the <recall> input row is the one training started from (related-word mean), not a fresh init
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from memory.token_manager import add_memory_tokens
    fresh, fresh_tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    rid = add_memory_tokens(fresh, fresh_tok)["<recall>"]
    assert torch.allclose(model.token_rows.embedding.weight[rid], fresh.get_input_embeddings().weight[rid])


def test_rule_made_questions_join_the_step1_cues(tiny_model_dir, tmp_path, capsys):
    from memory.questions import template_cues

    mem = _jsonl(tmp_path / "m.jsonl", [{"text": t, "user_id": "alex"} for t in FACTS])
    assert _run(tiny_model_dir, tmp_path, "--memories", str(mem), "--stage", "recall", "--k_folds", "0",
                "--cue_templates", "true") == 0
    metrics = json.loads((sorted((tmp_path / "out" / "runs").iterdir())[-1] / "recall" / "metrics.json").read_text())
    with MemoryVectorDB(tmp_path / "out" / "memory_db") as db:
        records = db.records()
        stored = sum(1 + sum(Cue.decode(c).kind != "text" for c in r.cues) for r in records)
        made = sum(len(q) for q in template_cues(records).values())
    assert made >= 6  # "Where do I live?", "What is my dog called?", "What do I work as?", ...
    # every stored cue and every rule-made question trains, less the generated questions the teacher dropped
    assert metrics["cues"] == stored + made - metrics.get("questions_dropped_by_teacher", 0)


def test_abstention_trains_general_prompts_as_no_memory(tiny_model_dir, tmp_path, caplog):
    from memory.sft_data import abstention_prompts, calibration_prompts, read_prompts

    caplog.set_level("INFO", logger="recall.text_embedding_train")
    assert not set(abstention_prompts()) & set(calibration_prompts())  # calibration never sees a trained prompt
    assert len(abstention_prompts(extra=None)) + len(calibration_prompts(extra=None)) == len(read_prompts())
    # the 309 everyday requests and 168 small-talk messages train "no memory" beside the bundled
    # half; none is measured anywhere
    from memory.sft_data import ABSTENTION_PROMPTS, SMALL_TALK_PROMPTS
    assert len(read_prompts(SMALL_TALK_PROMPTS)) == 168
    assert len(abstention_prompts()) == (len(abstention_prompts(extra=None)) + len(read_prompts(ABSTENTION_PROMPTS))
                                         + len(read_prompts(SMALL_TALK_PROMPTS)))
    assert abstention_prompts(extra=ABSTENTION_PROMPTS) != abstention_prompts()  # one file or several
    measured = [read_prompts(Path(f)) for f in ("examples/dev/general_prompts.json", "examples/test/general_prompts.json")]
    def norm(prompts):
        return {" ".join(p.lower().split()) for p in prompts}

    assert not norm(abstention_prompts()) & norm(p for group in measured for p in group)
    first = abstention_prompts()[:20]  # a fixed order, and a small bank's first few have both styles
    assert first == abstention_prompts()[:20]
    assert set(first) & set(read_prompts(ABSTENTION_PROMPTS)) and set(first) & set(abstention_prompts(extra=None))
    assert set(first) & set(read_prompts(SMALL_TALK_PROMPTS))
    # the 395 extra calibration prompts are never trained on, and the held-out ones never calibrate
    from memory.sft_data import HELDOUT_PROMPTS
    assert len(calibration_prompts()) == len(calibration_prompts(extra=None)) + 395
    assert not set(calibration_prompts()) & (set(abstention_prompts()) | set(read_prompts(HELDOUT_PROMPTS)))
    assert not set(abstention_prompts()) & set(read_prompts(HELDOUT_PROMPTS))
    mem = _jsonl(tmp_path / "m.jsonl", [{"text": t, "user_id": "alex"} for t in FACTS])
    assert _run(tiny_model_dir, tmp_path, "--memories", str(mem), "--stage", "recall", "--k_folds", "2",
                "--abstention", "true", "--cue_templates", "true") == 0
    metrics = json.loads((sorted((tmp_path / "out" / "runs").iterdir())[-1] / "recall" / "metrics.json").read_text())
    # at most two "no memory" prompts per labelled cue (--abstention_per_cue): a small bank is not swamped
    assert metrics["abstain_texts"] == min(len(abstention_prompts()), 2 * metrics["cues"]) and metrics["cues"] > 0
    assert isinstance(metrics["abstain_level"], float) and "'no memory' level starts at" in caplog.text
    assert len(metrics["kfold"]["per_fold"]) == 2  # "no memory" texts always train, never held out as cues


@pytest.mark.parametrize("abstention", ["true", "false"])
def test_a_step1_run_loads_with_or_without_a_no_memory_level(tiny_model_dir, tmp_path, abstention):
    """The loaders (evaluate's step-1 model, step 2's start) build without the level: a run
    trained with it loads (its level is ignored), and so does one trained before it existed."""
    from recall.text_embedding_train import load_recall_model

    mem = _jsonl(tmp_path / "m.jsonl", [{"text": t, "user_id": "alex"} for t in FACTS])
    assert _run(tiny_model_dir, tmp_path, "--memories", str(mem), "--stage", "recall", "--k_folds", "0",
                "--abstention", abstention) == 0
    run = sorted((tmp_path / "out" / "runs").iterdir())[-1] / "recall"
    assert ("abstain" in load_file(run / "recall_state.safetensors")) == (abstention == "true")
    model, _, _, _ = load_recall_model(run, precision="fp32")
    assert model.abstain is None


@pytest.mark.parametrize("per_cue", [1.0, 2.0])
def test_no_memory_prompts_are_at_most_per_cue_and_never_also_unlabelled(tokenizer, per_cue):
    """``with_abstention``: general prompts target the "no memory" row, ``per_cue`` per labelled
    cue at most; a prompt that is also an unlabelled text (--recall_general_prompts) is not kept twice
    with two opposite targets."""
    from memory.recall_step import build_dataset, with_abstention
    from memory.sft_data import ABSTENTION_PROMPTS, SMALL_TALK_PROMPTS, abstention_prompts, read_prompts
    from memory.vector_db import MemoryRecord

    records = [MemoryRecord(id=i, user_id="alex", text=t, status="active", session_id=None, message_index=None,
                            said_at=None, source="import", created_at="", updated_at="", superseded_by=None,
                            encoder_id="x", subject_key=None)
               for i, t in enumerate(["The user lives in Porto.", "The user has a dog called Max."])]
    cues = {0: [Cue("question", "Where do I live?")], 1: [Cue("question", "What is my dog called?")]}
    # every general prompt, the ones step 1 trains as "no memory" included, also as an unlabelled text
    data = build_dataset(tokenizer, records, cues, extra_texts=read_prompts() + read_prompts(ABSTENTION_PROMPTS)
                         + read_prompts(SMALL_TALK_PROMPTS))
    labelled = sum(0 <= d["target"] < 2 for d in data)
    out = with_abstention(data, tokenizer, n_rows=2, per_cue=per_cue)
    no_memory = [d["raw"] for d in out if d["target"] == 2]
    assert no_memory == abstention_prompts()[:int(per_cue * labelled)] and per_cue * labelled < len(abstention_prompts())
    raws = [d["raw"] for d in out]
    assert all(raws.count(t) == 1 for t in no_memory)  # not also an unlabelled text
    assert sum(d["target"] == -1 for d in out) == sum(d["target"] == -1 for d in data) - len(no_memory)


def test_recall_bench_runs_any_model_and_trains_on_the_annotated_source_turns(tiny_model_dir, tmp_path, capsys):
    """``python -m bench.recall_step1 --model_name_or_path M --sources`` end to end on the tiny model:
    every annotated memory gets its first mention's chat message as one more cue."""
    from bench.recall_step1 import main as bench_main, with_sources

    annotated = with_sources("examples/memories.jsonl", "examples/expected_facts.json", tmp_path / "m.jsonl")
    lines = [json.loads(x) for x in annotated.read_text().splitlines()]
    assert len(lines) == 42 and all(isinstance(x["message_index"], int) and x["session_id"] for x in lines)
    common = ["--model_name_or_path", str(tiny_model_dir), "--k_folds", "0", "--epochs", "1", "--no_throughput",
              "--train_precision", "fp32", "--set", "per_device_train_batch_size=32"]
    counts = {}
    for name, extra in (("plain", []), ("sources", ["--sources"])):
        out = tmp_path / f"{name}.json"
        assert bench_main(common + ["--work", str(tmp_path / name), "--json", str(out)] + extra) == 0
        result = json.loads(out.read_text())
        assert set(result["questions"]) == {"trained_recall", "untrained_last_token", "minilm_rag"}
        assert result["questions"]["minilm_rag"]["n"] == 49
        counts[name] = result["metrics"]["cues"]
    assert counts["sources"] > counts["plain"], counts
    with MemoryVectorDB(tmp_path / "sources" / "memory_db") as db:  # every memory stored its source turn
        sources = [[c.text for c in map(Cue.decode, r.cues) if c.kind == "source"] for r in db.records()]
    # (the tiny model's random vectors may merge a near-duplicate pair or so on import)
    assert len(sources) >= 40 and all(len(s) == 1 for s in sources)
    assert ["Hi! I moved to Porto two weeks ago."] in sources
    bad = _jsonl(tmp_path / "unknown.jsonl", [{"text": "The user owns a yacht."}])
    with pytest.raises(SystemExit, match="unknown.jsonl:1"):
        with_sources(str(bad), "examples/expected_facts.json", tmp_path / "x.jsonl")
