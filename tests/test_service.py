"""The pipeline (steps 0-2) through MemoryTrainingService and run_training.py, on the tiny model."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest

import run_training
from memory.chat_store import ChatFormatError
from memory.config import MemoryArguments, ModelArguments, parse_args
from memory.schema import ChatMessage, ChatSession
from memory.training_service import MemoryTrainingService
from recall.text_embedding_train import RecallTrainingArguments

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "chats"


def _service(model_dir, chats, out, **kw):
    return MemoryTrainingService(ModelArguments(model_name_or_path=str(model_dir), precision="fp32"),
                                 MemoryArguments(chats_dir=str(chats), stage="extract", extraction_batch_size=8, **kw),
                                 RecallTrainingArguments(output_dir=str(out)))


def _bad_files(chats: Path):
    (chats / "malformed.json").write_text('{"session_id": "x", "messages": [', encoding="utf-8")
    (chats / "schema.json").write_text(json.dumps({"session_id": "y", "messages": [{"role": "bot", "content": "hi"}]}))
    (chats / "empty.json").write_text(json.dumps({"session_id": "z", "messages": []}))
    (chats / "latin1.json").write_bytes('{"session_id": "w", "messages": [{"role": "user", "content": "caf\xe9"}]}'.encode("latin-1"))
    (chats / "huge.json").write_text(json.dumps({"session_id": "h", "messages": [{"role": "user", "content": "I " * 2_500_000}]}))
    (chats / "escape.json").write_text(json.dumps({"session_id": "../../x", "messages": [{"role": "user", "content": "I am here."}]}))
    dup = json.loads((chats / "2026-01-10-new-flat.json").read_text())
    (chats / "zz-duplicate.json").write_text(json.dumps(dup))
    return 7


def _hashes(directory: Path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture
def chats(tmp_path):
    d = tmp_path / "chats"
    d.mkdir()
    for name in ("2026-01-10-new-flat.json", "2026-03-15-sam-first-chat.json"):
        shutil.copy(EXAMPLES / name, d / name)
    return d


def test_rerun_extracts_only_new_or_changed_sessions(tiny_model_dir, chats, tmp_path):
    out = tmp_path / "out"
    svc = _service(tiny_model_dir, chats, out)
    first = svc.run_training()
    assert (first.sessions_read, first.sessions_extracted, first.sessions_rejected) == (2, 2, 0)
    again = svc.run_training()
    assert (again.sessions_unchanged, again.sessions_extracted) == (2, 0)
    svc.save_chat_session(ChatSession("new-one", "alex", "2026-07-01T00:00:00+00:00",
                                      [ChatMessage("user", "I live in Oslo now.")]))
    third = svc.run_training()
    assert (third.sessions_read, third.sessions_extracted) == (3, 1)
    svc.close()
    assert json.loads(Path(third.report_path).read_text())["summary"]["sessions_extracted"] == 1


def test_bad_input_is_reported_skipped_and_left_untouched(tiny_model_dir, chats, tmp_path):
    out = tmp_path / "out"
    svc = _service(tiny_model_dir, chats, out)
    svc.run_training()
    db_before = [(r.id, r.text, r.status) for r in svc.db.records()]
    n_bad = _bad_files(chats)
    before = _hashes(chats)
    summary = svc.run_training()
    assert summary.sessions_rejected == n_bad and summary.sessions_read == 2
    assert summary.sessions_extracted == 0  # the duplicate-id file is rejected, the original is unchanged
    assert _hashes(chats) == before  # rejected files are left in place, byte for byte
    assert [(r.id, r.text, r.status) for r in svc.db.records()] == db_before
    report = json.loads(Path(summary.report_path).read_text())
    reasons = {Path(r["path"]).name: r["reason"] for r in report["rejected_sessions"]}
    assert set(reasons) == {"malformed.json", "schema.json", "empty.json", "latin1.json", "huge.json",
                            "escape.json", "zz-duplicate.json"}
    for name, reason in reasons.items():
        assert name in reason
    assert "2026-01-10-new-flat.json" in reasons["zz-duplicate.json"]
    svc.close()


def test_strict_makes_bad_input_fatal(tiny_model_dir, chats, tmp_path, capsys):
    (chats / "malformed.json").write_text("{", encoding="utf-8")
    svc = _service(tiny_model_dir, chats, tmp_path / "out", strict=True)
    with pytest.raises(ChatFormatError, match="malformed.json"):
        svc.run_training()
    svc.close()
    code = run_training.main(["--model_name_or_path", str(tiny_model_dir), "--chats_dir", str(chats),
                              "--output_dir", str(tmp_path / "out2"), "--strict", "true", "--stage", "extract"])
    assert code == 1 and "malformed.json" in capsys.readouterr().err


def test_cli_prints_summary(tiny_model_dir, chats, tmp_path, capsys):
    code = run_training.main(["--model_name_or_path", str(tiny_model_dir), "--chats_dir", str(chats),
                              "--output_dir", str(tmp_path / "out"), "--stage", "extract", "--precision", "fp32"])
    out = capsys.readouterr().out
    assert code == 0
    assert "sessions: 2 read, 0 rejected" in out and "memories:" in out and "time:" in out


def test_config_file_and_errors(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: from-yaml\nextraction_unit: message\n")
    model_args, args, train_args = parse_args(["--config", str(cfg), "--seed", "7"])
    assert (train_args.output_dir, args.extraction_unit, train_args.seed) == ("from-yaml", "message", 7)
    model_args, args, train_args = parse_args(["--config", str(cfg), "--output_dir", "cli"])
    assert train_args.output_dir == "cli"
    cfg.write_text("no_such_option: 1\n")
    with pytest.raises(ValueError, match="no_such_option"):
        parse_args(["--config", str(cfg)])
    cfg.write_text("- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        parse_args(["--config", str(cfg)])
    assert run_training.main(["--stage", "bogus"]) == 2


def test_missing_model_is_a_clear_error(chats, tmp_path, capsys):
    code = run_training.main(["--model_name_or_path", str(tmp_path / "nope"), "--chats_dir", str(chats),
                              "--output_dir", str(tmp_path / "out")])
    assert code == 1 and "nope" in capsys.readouterr().err


def test_step2_options_parse_to_the_trainers_own_defaults(tmp_path):
    """Every ``--decode_*`` option, parsed from an empty command line, equals the default of
    the ``MemoryDecodingArguments`` field it feeds (a bool once silently parsed to False)."""
    import dataclasses

    from memory.config import parse_args
    from recall.text_memory_train import MemoryDecodingArguments

    _, args, _ = parse_args(["--output_dir", str(tmp_path)])
    defaults = {f.name: f.default for f in dataclasses.fields(MemoryDecodingArguments)}
    renamed = {"decode_epochs": "num_train_epochs", "decode_batch_size": "per_device_train_batch_size"}
    checked = 0
    for f in dataclasses.fields(args):
        if f.name.startswith("decode_"):
            name = renamed.get(f.name, f.name.removeprefix("decode_"))
            assert getattr(args, f.name) == defaults[name], f.name
            checked += 1
    assert checked >= 14
