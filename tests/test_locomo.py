"""LoCoMo read in place: parsing, chat import, gold memories, LoCoMo's F1 and the BM25 peer."""
import json

import numpy as np
import pytest

from memory.chat_store import ChatStore
from memory.locomo import (BM25, DEFAULT_PATH, LocomoFormatError, answer_f1, chat_sessions, gold_candidates,
                           load_locomo, normalize_answer, token_f1)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _conversation(**over):
    conv = {
        "sample_id": "c1",
        "conversation": {
            "speaker_a": "Ana", "speaker_b": "Bo",
            "session_1_date_time": "1:56 pm on 8 May, 2023",
            "session_1": [{"speaker": "Ana", "dia_id": "D1:1", "text": "I adopted a cat named Miso."},
                          {"speaker": "Bo", "dia_id": "D1:2", "text": "Lovely! Mine is a dog.",
                           "blip_caption": "a photo of a dog on a sofa"}],
            "session_2_date_time": "10:00 am on 9 May, 2023",
            "session_2": [{"speaker": "Bo", "dia_id": "D2:1", "text": "I moved to Lisbon."},
                          {"speaker": "Ana", "dia_id": "D2:2", "text": "I play cello on Thursdays."}],
        },
        "observation": {
            "session_1_observation": {"Ana": [["Ana adopted a cat named Miso.", "D1:1"]],
                                      "Bo": [["Bo has a dog.", "D1:2"]]},
            "session_2_observation": {"Bo": [["Bo moved to Lisbon.", "D2:1"]],
                                      "Ana": [["Ana plays cello on Thursdays.", ["D2:2"]]]},
        },
        "qa": [{"question": "What is Ana's cat called?", "answer": "Miso", "evidence": ["D1:1"], "category": 4},
               {"question": "Where did Bo move?", "answer": "Lisbon", "evidence": ["D2:1"], "category": 4},
               {"question": "When?", "answer": 2023, "evidence": ["D9:9"], "category": 2},
               {"question": "Trick", "adversarial_answer": "x", "evidence": ["D1:1"], "category": 5}],
    }
    conv.update(over)
    return conv


def _write(tmp_path, data):
    path = tmp_path / "locomo.json"
    path.write_text(json.dumps(data))
    return path


def test_parse_a_small_file(tmp_path):
    [c] = load_locomo(_write(tmp_path, [_conversation()]))
    assert c.sample_id == "c1" and c.speakers == ("Ana", "Bo") and [s.number for s in c.sessions] == [1, 2]
    assert c.sessions[0].date_time == "2023-05-08T13:56:00+00:00"
    assert c.sessions[0].turns[1].text == "Lovely! Mine is a dog. [shares a photo of a dog on a sofa]"
    assert [f.dia_ids for f in c.facts] == [("D1:1",), ("D1:2",), ("D2:1",), ("D2:2",)]
    assert [q.question for q in c.questions()] == ["What is Ana's cat called?", "Where did Bo move?"]
    assert c.qa[2].answer == "2023" and c.qa[3].answer == "x"
    first = c.limited(1)
    assert len(first.sessions) == 1 and len(first.facts) == 2 and [q.answer for q in first.questions()] == ["Miso"]


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c["conversation"].pop("speaker_a"), "conversation: missing field 'speaker_a'"),
    (lambda c: c["conversation"].update(session_1_date_time="yesterday"), "session_1_date_time"),
    (lambda c: c["conversation"]["session_1"][0].update(speaker="Zed"), "session_1[0].speaker"),
    (lambda c: c["conversation"]["session_1"][0].update(dia_id="nonsense"), "session_1[0].dia_id"),
    (lambda c: c["qa"][0].update(category="four"), "qa[0].category"),
    (lambda c: c["observation"].update(session_1_observation=[["x", "D1:1"]]), "observation.session_1_observation"),
])
def test_bad_input_names_the_file_and_field(tmp_path, mutate, field):
    conv = _conversation()
    mutate(conv)
    path = _write(tmp_path, [conv])
    with pytest.raises(LocomoFormatError) as err:
        load_locomo(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(LocomoFormatError, match="file not found"):
        load_locomo(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(LocomoFormatError, match="bad.json: not valid"):
        load_locomo(tmp_path / "bad.json")


def test_sessions_per_speaker_round_trip_through_the_chat_store(tmp_path):
    [c] = load_locomo(_write(tmp_path, [_conversation()]))
    sessions = chat_sessions(c)
    assert [s.session_id for s in sessions] == ["c1-s1-Ana", "c1-s1-Bo", "c1-s2-Ana", "c1-s2-Bo"]
    ana = sessions[0]
    assert ana.user_id == "c1:Ana" and [m.role for m in ana.messages] == ["user", "assistant"]
    assert [m.role for m in sessions[1].messages] == ["assistant", "user"]
    store = ChatStore(tmp_path / "chats")
    for s in sessions:
        store.save_session(s)
    loaded = {s.session_id: s for s in store.load_sessions(strict=True).sessions}
    assert loaded["c1-s2-Ana"].messages[1].content == "I play cello on Thursdays."
    assert loaded["c1-s1-Ana"].created_at.startswith("2023-05-08T13:56")


def test_gold_memories_point_at_their_source_turn(tmp_path):
    [c] = load_locomo(_write(tmp_path, [_conversation()]))
    sessions = {s.session_id: s for s in chat_sessions(c)}
    pairs = gold_candidates(c)
    for cand, cited in pairs:
        message = sessions[cand.session_id].messages[cand.message_index]
        turn = next(t for s in c.sessions for t in s.turns if t.dia_id == cited[0])
        assert message.content == turn.text and message.role == "user"
    assert {cand.user_id for cand, _ in pairs} == {"c1:Ana", "c1:Bo"}
    assert {cand.user_id for cand, _ in gold_candidates(c, bank_user="c1")} == {"c1"}


def test_the_real_file_reads_in_place():
    if not DEFAULT_PATH.is_file():
        pytest.skip(f"{DEFAULT_PATH} is not on this machine")
    convs = load_locomo()
    assert len(convs) == 10 and sum(len(c.sessions) for c in convs) == 272
    first = convs[0]
    assert first.sample_id == "conv-26" and len(first.facts) == 184
    assert len(first.questions()) == 121  # categories 1-4 with an evidence turn some observation cites
    assert all(m.content for s in chat_sessions(first) for m in s.messages)


def test_locomo_f1_normalisation():
    assert normalize_answer("The cat, and a Dog!") == "cat dog"
    assert token_f1("7 May 2023", "7 May, 2023") == 1.0
    assert token_f1("running shoes", "run") == pytest.approx(2 * 0.5 * 1 / 1.5)  # stemmed: run shoe vs run
    assert token_f1("nothing here", "Lisbon") == 0.0
    # multi-hop: each comma-separated gold part takes its best predicted part
    assert answer_f1("pottery, camping", "camping, pottery", 1) == 1.0
    assert answer_f1("pottery", "camping, pottery", 1) == 0.5
    # open-domain: the answer before ';'
    assert answer_f1("likely yes", "Likely yes; she said so", 3) == 1.0


def test_bm25_ranks_rare_terms_first():
    docs = ["Ana adopted a cat named Miso.", "Bo moved to Lisbon.", "Ana plays cello.", "Bo likes cats."]
    bm = BM25(docs)
    scores = bm.scores("Where did Bo move to, Lisbon?")
    assert int(np.argmax(scores)) == 1
    assert bm.scores("the of and") == [0.0] * 4  # stop words only


def test_evaluation_ranks_with_a_custom_hit_rule(tmp_path):
    """bench.locomo's rule (a memory citing an evidence turn) goes through the harness's ranking."""
    from memory.evaluation import _ranks
    from memory.schema import MemoryCandidate
    from memory.vector_db import MemoryVectorDB

    db = MemoryVectorDB(tmp_path / "db")
    try:
        ids = db.add([MemoryCandidate(t, "u") for t in ("alpha", "beta", "gamma")], np.eye(3, 4, dtype=np.float32),
                     "test")
        cited = {ids[0]: ["D1:1"], ids[1]: ["D1:2"], ids[2]: ["D2:1"]}
        questions = [{"question": "q", "expected": "-", "user_id": "u", "evidence": ["D2:1"]}]
        rows = _ranks(questions, db, lambda texts, recs: np.array([[0.9, 0.5, 0.1]]),
                      is_hit=lambda q, r: bool(set(q["evidence"]) & set(cited[r.id])))
        assert rows[0]["rank"] == 3
    finally:
        db.close()


def test_the_end_to_end_part_answers_with_every_system_and_renders_one_row_each(tmp_path, tiny_model_dir,
                                                                                 monkeypatch):
    """bench.locomo --parts e2e on a two-session conversation with the tiny model: the five systems
    answer every question, the report holds F1 per category, context tokens and seconds per answer
    for each, and the table pools them."""
    import bench.locomo as bl

    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in [
        ("Say hi.", "Hi there!"), ("Name a colour.", "Blue.")]) + "\n")
    monkeypatch.setattr(bl, "PIPELINE_FLAGS", [
        "--model_name_or_path", str(tiny_model_dir), "--precision", "fp32", "--per_device_train_batch_size", "4",
        "--lora_r", "4", "--cue_questions", "0", "--sft_data", str(sft), "--sft_self_distill", "false",
        "--decode_epochs", "1", "--decode_min_steps", "0", "--decode_lora_r", "4", "--decode_projector_hidden", "32",
        "--disable_tqdm", "true"])
    [conv] = load_locomo(_write(tmp_path, [_conversation()]))
    work = tmp_path / "work"
    bl.run_retrieval(conv, work, 1, "all")
    report = bl.run_e2e(conv, work)
    assert report["questions"] == 2 and len(report["per_question"]) == 2
    for name in bl.E2E_SYSTEMS:
        assert 0.0 <= report[f"f1_{name}"] <= 1.0 and report[f"context_tokens_{name}"] > 0
        assert report[f"seconds_per_answer_{name}"] > 0 and "single-hop" in report[f"by_category_f1_{name}"]
    assert report["invented_recall_rate_chat_forced"] == 0.0 and report["invented_recall_rate_chat"] == 0.0
    # the memories in the peer's prompt cost context: top 3 reads more than top 1, which reads more than none
    assert report["context_tokens_rag_top3"] > report["context_tokens_rag_top1"] > report["context_tokens_no_memory"]
    table = "\n".join(bl.e2e_table([report]))
    assert all(bl.E2E_NAMES[n] in table for n in bl.E2E_SYSTEMS)
