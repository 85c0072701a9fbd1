"""Step 4 (publishing versions), the whole pipeline on the tiny model, chat.py and evaluate.py."""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import run_training
from memory.publish import CURRENT, MANIFEST, VersionError, list_versions, publish_version, resolve_current
from memory.sft_data import SFTFormatError, read_sft_data, read_sft_jsonl, self_distilled

ROOT = Path(__file__).resolve().parent.parent
FACTS = ["The user lives in Porto.", "The user has a dog called Max.", "The user works as a nurse."]


def _write_files(names):
    def write(tmp: Path):
        for n in names:
            (tmp / n).write_text(n)
        return list(names)
    return write


def test_publish_switches_current_and_keeps_retention(tmp_path):
    models = tmp_path / "models"
    made = [publish_version(models, _write_files(["a.txt"]), {"i": i}, retention=3) for i in range(4)]
    versions = list_versions(models)
    assert len(versions) == 3 and made[0] not in versions
    assert resolve_current(models) == made[-1].resolve()
    assert json.loads((made[-1] / MANIFEST).read_text())["i"] == 3
    assert os.readlink(models / CURRENT) == made[-1].name  # relative link: the folder can move


@pytest.mark.reliability(fault='An exception in the middle of publishing', outcome='current and old versions unchanged')
def test_a_failed_publish_leaves_current_and_old_versions(tmp_path):
    models = tmp_path / "models"
    first = publish_version(models, _write_files(["a.txt"]), {})

    def crash(tmp):
        (tmp / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        publish_version(models, crash, {})
    assert resolve_current(models) == first.resolve() and list_versions(models) == [first]
    assert not list(models.glob(".tmp-*"))


@pytest.mark.reliability(fault='A publishing process SIGKILLed before the manifest', outcome='current still loads')
def test_a_process_killed_before_the_manifest_leaves_current_loadable(tmp_path):
    models = tmp_path / "models"
    first = publish_version(models, _write_files(["a.txt"]), {})
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from memory.publish import publish_version
        def write(tmp):
            (tmp / "model.safetensors").write_text("half written")
            os.kill(os.getpid(), signal.SIGKILL)
        publish_version(Path({str(models)!r}), write, {{}})
    """)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -9
    assert list(models.glob(".tmp-*"))  # the killed publish left its temp dir ...
    assert resolve_current(models) == first.resolve()  # ... which is never used
    second = publish_version(models, _write_files(["b.txt"]), {})
    assert resolve_current(models) == second.resolve() and not list(models.glob(".tmp-*"))


@pytest.mark.reliability(fault='A version directory without a manifest', outcome='never used')
def test_a_version_without_manifest_is_never_used(tmp_path):
    models = tmp_path / "models"
    first = publish_version(models, _write_files(["a.txt"]), {})
    newer = models / "model_29990101_000000"
    newer.mkdir()
    (newer / "recall_config.json").write_text("{}")
    os.unlink(models / CURRENT)
    assert resolve_current(models) == first.resolve()
    from memory.publish import open_version

    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        open_version(newer)
    with pytest.raises(VersionError):
        resolve_current(tmp_path / "empty")


def test_sft_jsonl_formats_and_errors(tmp_path):
    good = tmp_path / "sft.jsonl"
    good.write_text("\n".join(json.dumps(x) for x in [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"instruction": "Add", "input": "2+2", "output": "4"},
        {"prompt": "Sky colour?", "completion": "Blue."}]) + "\n")
    examples = read_sft_jsonl(good)
    assert [(e.prompt, e.answer) for e in examples] == [("Hi", "Hello!"), ("Add\n\n2+2", "4"), ("Sky colour?", "Blue.")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n" + json.dumps({"messages": [
        {"role": "user", "content": "only a question"}]}) + "\n")
    with pytest.raises(SFTFormatError, match=r"bad.jsonl:2.messages: no assistant turn"):
        read_sft_jsonl(bad)
    bad.write_text('{"prompt": 3, "completion": "y"}\n')
    with pytest.raises(SFTFormatError, match=r"bad.jsonl:1.prompt: expected a string"):
        read_sft_jsonl(bad)


def test_sft_data_from_parquet_and_a_saved_dataset_via_datasets(tmp_path):
    import datasets

    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
            {"messages": [{"role": "user", "content": "Sky colour?"}, {"role": "assistant", "content": "Blue."}]}]
    data = datasets.Dataset.from_list(rows)
    data.to_parquet(str(tmp_path / "sft.parquet"))
    data.save_to_disk(str(tmp_path / "saved"))
    for source in (tmp_path / "sft.parquet", tmp_path / "saved"):
        assert [(e.prompt, e.answer) for e in read_sft_data(str(source))] == [("Hi", "Hello!"), ("Sky colour?", "Blue.")]
    datasets.Dataset.from_list([{"prompt": "x", "completion": ""}]).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(SFTFormatError, match=r"bad.parquet\[0\]: empty prompt or answer"):
        read_sft_data(str(tmp_path / "bad.parquet"))
    with pytest.raises(SFTFormatError, match="cannot be loaded by datasets"):
        read_sft_data(str(tmp_path / "missing_dir_or_hub_id"))


def test_self_distilled_answers_are_cached(tokenizer, tmp_path):
    from tests.conftest import make_tiny_model

    model = make_tiny_model(tokenizer, initializer_range=0.5)  # peaked enough to emit ordinary tokens
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["Say hi.", "Name a colour."]))
    first = self_distilled(model, tokenizer, "tiny", tmp_path / "cache", prompts, max_new_tokens=4)
    [cache] = list((tmp_path / "cache").glob("*.json"))
    assert [d["prompt"] for d in json.loads(cache.read_text())] == [e.prompt for e in first]
    assert first and all(e.answer for e in first)  # empty answers are dropped
    second = self_distilled(None, None, "tiny", tmp_path / "cache", prompts, max_new_tokens=4)  # no model needed
    assert first == second
    other = tmp_path / "p2.json"
    other.write_text(json.dumps(["Something else."]))
    with pytest.raises(AttributeError):  # another prompt set is another cache key: it must generate
        self_distilled(None, None, "tiny", tmp_path / "cache", other, max_new_tokens=4)


# ---------------------------------------------------------------- the whole pipeline
def _run(tiny_model_dir, tmp_path, *extra):
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in [
        ("Say hi.", "Hi there!"), ("Name a colour.", "Blue."), ("Count to three.", "One, two, three.")]) + "\n")
    mem = tmp_path / "m.jsonl"
    mem.write_text("\n".join(json.dumps({"text": t, "user_id": "alex"}) for t in FACTS) + "\n")
    return run_training.main(["--model_name_or_path", str(tiny_model_dir), "--chats_dir", "", "--precision", "fp32",
                              "--output_dir", str(tmp_path / "out"), "--num_train_epochs", "1",
                              "--per_device_train_batch_size", "4", "--lora_r", "4", "--cue_questions", "1",
                              "--k_folds", "0", "--memories", str(mem), "--sft_data", str(sft),
                              "--sft_self_distill", "false", "--decode_epochs", "1", "--decode_min_steps", "0", "--decode_lora_r", "4",
                              "--decode_projector_hidden", "32", "--disable_tqdm", "true", *extra])


@pytest.fixture(scope="module")
def published(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    assert _run(tiny_model_dir, tmp) == 0
    return tmp


def test_run_training_publishes_a_loadable_version(published, capsys):
    from transformers import AutoModelForCausalLM

    from memory.vector_db import MemoryVectorDB

    current = resolve_current(published / "out" / "models")
    manifest = json.loads((current / MANIFEST).read_text())
    assert all((current / f).exists() for f in manifest["files"]) and manifest["memories"] == 3
    for f in ("config.json", "model.safetensors", "tokenizer.json", "recall_state.safetensors",
              "recall_config.json", "metrics.json", "memory_db/memories.sqlite3"):
        assert f in manifest["files"]
    lm = AutoModelForCausalLM.from_pretrained(current)  # ordinary chat needs nothing of ours
    assert lm(torch.tensor([[1, 2, 3]])).logits.shape[-1] >= 49155
    with MemoryVectorDB(current / "memory_db") as db:  # the snapshot: trained memories are active
        assert sorted(r.text for r in db.records(statuses=("active",))) == sorted(FACTS)
    metrics = json.loads((current / "metrics.json").read_text())
    assert {"recall_before", "recall_after", "decode_exact_match", "train"} <= set(metrics["decoding"])
    assert metrics["decoding"]["train"]["precision"] == "fp32 weights"


def test_bf16_autocast_reaches_both_trainers(tiny_model_dir, tmp_path):
    """On a CPU, bf16 inference (``--precision bf16``) trains step 1 and step 2 under bf16 autocast
    too (``--train_precision auto``), and the run's metrics say what each trained in. HF's own
    ``--bf16 true --use_cpu true`` does the same on an fp32 runtime (tests/test_cpu_bf16.py)."""
    assert _run(tiny_model_dir, tmp_path, "--precision", "bf16") == 0
    current = resolve_current(tmp_path / "out" / "models")
    metrics = json.loads((current / "metrics.json").read_text())
    assert metrics["decoding"]["train"]["precision"] == "fp32 weights + bf16 autocast"
    (run,) = (tmp_path / "out" / "runs").iterdir()
    assert json.loads((run / "recall" / "metrics.json").read_text())["precision"] == "fp32 weights + bf16 autocast"
    assert math.isfinite(metrics["decoding"]["train"]["loss"])


def test_chat_ask_shows_the_recall(published, capsys):
    import chat

    models = str(published / "out" / "models")
    assert chat.main(["--model_dir", models, "--ask", "Where do I live?", "--force-recall", "--user", "alex",
                      "--threshold", "-1", "--max_new_tokens", "8", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "[recall] score" in out and "| The user" in out  # a verified span shows the stored memory
    # the default (--recall auto) probes the turn: a memory above the threshold is recalled, ...
    assert chat.main(["--output_dir", str(published / "out"), "--ask", "Where do I live?", "--user", "alex",
                      "--threshold", "-1", "--max_new_tokens", "8", "--precision", "fp32"]) == 0
    assert "[recall] score" in capsys.readouterr().out
    # ... and below it the model answers alone, with no recall span
    assert chat.main(["--output_dir", str(published / "out"), "--ask", "Where do I live?", "--user", "alex",
                      "--threshold", "2", "--max_new_tokens", "8", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "[no recall] (best memory's score" in out and "[recall] score" not in out
    assert chat.main(["--model_dir", models, "--ask", "Hello", "--user", "nobody", "--max_new_tokens", "4",
                      "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "memory is empty for user 'nobody': answering without recall" in out


def test_evaluate_reports_the_recall_loop(published, tmp_path, capsys):
    import evaluate

    questions = tmp_path / "q.json"
    questions.write_text(json.dumps([{"question": "Where do I live?", "expected": "porto", "user_id": "alex"}]))
    report = tmp_path / "r.json"
    assert evaluate.main(["--output_dir", str(published / "out"), "--questions", str(questions),
                          "--report", str(report), "--precision", "fp32"]) == 0
    data = json.loads(report.read_text())
    assert data["decoding"]["n"] == 3 and data["answers"]["n"] == 1
    assert 0.0 <= data["forgetting"]["greedy_agreement"] <= 1.0 and data["forgetting"]["tokens"] > 0
    out = capsys.readouterr().out
    assert "decode_exact_match" in out and "RAG peer, MiniLM top 3" in out
    # the report contract: the answer a user reads, next to the peer, in one run
    chat = data["chat"]
    assert {"final_hit_rate", "asked_rate", "invented_recall_rate", "n", "context_tokens",
            "seconds_per_answer"} <= set(chat) and chat["n"] == 1
    assert chat["invented_recall_rate"] == 0.0  # verified spans show stored memories only
    assert set(data["rag_peer"]["by_k"]) == {"1", "2", "3"} and data["rag_peer"]["n"] == 1
    assert data["rag_peer"]["final_hit_rate"] == max(v["final_hit_rate"] for v in data["rag_peer"]["by_k"].values())
    assert all({"final_hit_rate", "context_tokens", "seconds_per_answer"} <= set(v)
               for v in data["rag_peer"]["by_k"].values())
    assert data["rag_peer"]["by_k"]["3"]["context_tokens"] > data["rag_peer"]["by_k"]["1"]["context_tokens"]
    assert {"final_hit_rate", "n"} <= set(data["no_memory"])
    assert data["general"]["n"] == 40 and 0.0 <= data["general"]["false_recall_rate"] <= 1.0


def test_invented_recall_rate_reads_the_spans_the_user_sees(published):
    """The tiny model cannot decode its memories: unverified, every forced span is invented; verified,
    none is. A question without user_id asks as the version's default user."""
    from memory.evaluation import chat_figures
    from recall.generation import ChatDefaults
    from memory.publish import open_version

    model, db = open_version(published / "out" / "models", precision="fp32")
    try:
        questions = [{"question": "Where do I live?", "expected": "porto", "user_id": "alex"},
                     {"question": "What is my job?", "expected": "nurse", "user_id": "alex"}]
        loose = chat_figures(model.engine, db, questions, -1.0, defaults=ChatDefaults(recall="force", verify=False,
                                                                                       max_new_tokens=24))
        assert loose["asked_rate"] == 1.0 and loose["invented_recall_rate"] == 1.0
        checked = chat_figures(model.engine, db, questions, -1.0, defaults=ChatDefaults(recall="force",
                                                                                         max_new_tokens=24))
        assert checked["invented_recall_rate"] == 0.0
        assert all(r["recalled"][0].startswith("The user") for r in checked["per_question"])
        never = chat_figures(model.engine, db, questions, 2.0, defaults=ChatDefaults(max_new_tokens=4))
        assert never["asked_rate"] == 0.0 and never["invented_recall_rate"] == 0.0
    finally:
        db.close()


@pytest.mark.reliability(fault='Ctrl-C during step 2', outcome='current unchanged')
def test_an_interrupted_training_leaves_current_unchanged(published, tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    work = tmp_path / "copy"
    shutil.copytree(published, work, symlinks=True)
    before = resolve_current(work / "out" / "models")
    from memory import training_service

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(training_service.MemoryTrainingService, "train_memory_decoding", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model_dir, work, "--full", "true")
    assert resolve_current(work / "out" / "models") == before
