"""Tests for memory/chat_store.py: chat sessions saved (step 0) and loaded (step 1)."""
import hashlib
import json
import logging
import os
import pickle
import stat
import time

import pytest

from memory.chat_store import (
    ChatFormatError,
    ChatStore,
    normalize_timestamp,
    parse_session,
    validate_session_id,
)
from memory.schema import ChatMessage, ChatSession

GOOD = {
    "session_id": "good-1",
    "user_id": "alice",
    "created_at": "2024-05-01T10:00:00+00:00",
    "messages": [
        {"role": "user", "content": "I live in Lyon.", "timestamp": "2024-05-01T10:00:00+00:00"},
        {"role": "assistant", "content": "Noted!"},
    ],
}


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def snapshot(directory):
    """{relative path: sha256} of every file under ``directory``."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, directory)] = hashlib.sha256(handle.read()).hexdigest()
    return out


def make_session(session_id="s1", text="hello"):
    return ChatSession(
        session_id=session_id,
        user_id="bob",
        created_at="2024-01-02T03:04:05+00:00",
        messages=[
            ChatMessage("system", "Be brief."),
            ChatMessage("user", text, "2024-01-02T03:04:05+00:00"),
            ChatMessage("assistant", "Hi – ça va? 你好", "2024-01-02T03:04:06+00:00"),
        ],
    )


# --------------------------------------------------------------------------- formats

def test_canonical_round_trip(tmp_path):
    store = ChatStore(tmp_path / "chats")
    session = make_session()
    path = store.save_session(session)

    assert path == tmp_path / "chats" / "s1.json"
    on_disk = json.loads(path.read_text(encoding="utf-8"))
    assert on_disk == session.to_dict()
    assert "你好" in path.read_text(encoding="utf-8")  # ensure_ascii=False
    result = store.load_sessions()
    assert result.rejected == []
    [loaded] = result.sessions
    assert loaded.to_dict() == session.to_dict()
    assert loaded.content_hash() == session.content_hash()
    assert loaded.source_path == str(path)


def test_bare_list_uses_file_stem_and_first_timestamp(tmp_path):
    write_json(tmp_path / "chat-7.json", [
        {"role": "user", "content": "hi", "timestamp": "2024-03-03T12:00:00Z"},
        {"role": "assistant", "content": "hello"},
    ])
    [session] = ChatStore(tmp_path, default_user_id="carol").load_sessions(strict=True).sessions
    assert session.session_id == "chat-7"
    assert session.user_id == "carol"
    assert session.created_at == "2024-03-03T12:00:00+00:00"
    assert [m.role for m in session.messages] == ["user", "assistant"]


def test_sharegpt(tmp_path):
    write_json(tmp_path / "x.json", {"id": "sg-42", "conversations": [
        {"from": "system", "value": "sys"},
        {"from": "human", "value": "What is 2+2?"},
        {"from": "gpt", "value": "4"},
        {"from": "ChatGPT", "value": "four"},
    ]})
    write_json(tmp_path / "no-id.json", {"conversations": [{"from": "user", "value": "yo"}]})
    sessions = {s.session_id: s for s in ChatStore(tmp_path).load_sessions(strict=True).sessions}
    assert set(sessions) == {"sg-42", "no-id"}
    assert [m.role for m in sessions["sg-42"].messages] == ["system", "user", "assistant", "assistant"]
    assert sessions["sg-42"].messages[1].content == "What is 2+2?"


def test_sharegpt_integer_id_becomes_string():
    session = parse_session({"id": 17, "conversations": [{"from": "human", "value": "a"}]}, source="f.json")
    assert session.session_id == "17"


def test_created_at_falls_back_to_mtime_then_now(tmp_path):
    path = write_json(tmp_path / "old.json", [{"role": "user", "content": "hi"}])
    os.utime(path, (86400, 86400))
    [session] = ChatStore(tmp_path).load_sessions(strict=True).sessions
    assert session.created_at == "1970-01-02T00:00:00+00:00"

    before = time.time()
    fresh = parse_session([{"role": "user", "content": "hi"}], source="m", fallback_session_id="m")
    assert normalize_timestamp(before - 1, source="t", field="t") <= fresh.created_at


def test_load_is_sorted_by_created_at_then_id(tmp_path):
    for name, sid, created in [("a", "zz", "2024-01-02"), ("b", "bb", "2024-01-01"),
                               ("c", "aa", "2024-01-02"), ("d", "cc", "2023-12-31T23:00:00-02:00")]:
        write_json(tmp_path / f"{name}.json",
                   {"session_id": sid, "created_at": created, "messages": [{"role": "user", "content": "x"}]})
    sessions = ChatStore(tmp_path).load_sessions(strict=True).sessions
    # "cc" is 2024-01-01T01:00Z once converted to UTC, so it sorts after "bb".
    assert [s.session_id for s in sessions] == ["bb", "cc", "aa", "zz"]


def test_recursive_and_skips_dotfiles_and_temp_files(tmp_path):
    write_json(tmp_path / "sub" / "deep.json", [{"role": "user", "content": "x"}])
    write_json(tmp_path / ".hidden.json", [{"role": "user", "content": "x"}])
    write_json(tmp_path / ".git" / "inner.json", [{"role": "user", "content": "x"}])
    (tmp_path / ".s1.json.abc123.tmp").write_text("{half a fi", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not a chat", encoding="utf-8")
    result = ChatStore(tmp_path).load_sessions()
    assert [s.session_id for s in result.sessions] == ["deep"]
    assert result.rejected == []


@pytest.mark.reliability(fault="UPPER.JSON files and directories named *.json in the chats folder",
                         outcome="named in the log, never skipped in silence")
def test_files_named_like_sessions_but_not_read_are_named_in_the_log(tmp_path, caplog):
    write_json(tmp_path / "UPPER.JSON", [{"role": "user", "content": "x"}])
    write_json(tmp_path / "dir.json" / "inner.json", [{"role": "user", "content": "x"}])
    with caplog.at_level("WARNING"):
        result = ChatStore(tmp_path).load_sessions()
    assert [s.session_id for s in result.sessions] == ["inner"]
    assert "UPPER.JSON: not read" in caplog.text and "dir.json: a directory named like a session file" in caplog.text


# --------------------------------------------------------------------------- writing

def test_atomic_write_modes_and_no_temp_files(tmp_path):
    directory = tmp_path / "new" / "chats"
    store = ChatStore(directory)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    old_umask = os.umask(0)
    try:
        store.save_session(make_session())
        store.save_session(make_session(text="changed"))  # overwrite keeps 0600
    finally:
        os.umask(old_umask)
    assert sorted(os.listdir(directory)) == ["s1.json"]
    assert stat.S_IMODE(os.stat(directory / "s1.json").st_mode) == 0o600
    assert store.load_sessions(strict=True).sessions[0].messages[1].content == "changed"


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    store = ChatStore(tmp_path)
    path = store.save_session(make_session())
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        store.save_session(make_session(text="new"))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["s1.json"]


def test_save_validates_session(tmp_path):
    store = ChatStore(tmp_path)
    bad = make_session()
    bad.messages[0].role = "bot"
    with pytest.raises(ChatFormatError, match=r"s1\.json: messages\[0\]\.role: expected one of"):
        store.save_session(bad)
    assert os.listdir(tmp_path) == []


def test_append_messages_creates_then_appends(tmp_path):
    store = ChatStore(tmp_path)
    first = store.append_messages("live", [{"role": "user", "content": "hi"}], user_id="dana")
    assert first.user_id == "dana" and first.messages[0].timestamp is not None
    second = store.append_messages("live", [ChatMessage("assistant", "hello")])
    assert [m.content for m in second.messages] == ["hi", "hello"]
    assert second.created_at == first.created_at
    assert stat.S_IMODE(os.stat(tmp_path / "live.json").st_mode) == 0o600
    assert store.load_sessions(strict=True).sessions[0].to_dict() == second.to_dict()
    with pytest.raises(ChatFormatError, match="user_id: session belongs to 'dana'"):
        store.append_messages("live", [{"role": "user", "content": "x"}], user_id="eve")


def test_append_refuses_to_overwrite_corrupt_file(tmp_path):
    store = ChatStore(tmp_path)
    (tmp_path / "live.json").write_bytes(b"{oops")
    with pytest.raises(ChatFormatError, match="malformed JSON"):
        store.append_messages("live", [{"role": "user", "content": "hi"}])
    assert (tmp_path / "live.json").read_bytes() == b"{oops"


# --------------------------------------------------------------------------- rejections

def _msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


BAD_FILES = [
    ("malformed.json", b'{"messages": [', "malformed JSON"),
    ("empty-file.json", b"", "file is empty"),
    ("wrong-schema.json", json.dumps({"foo": 1}).encode(), "expected an object with a 'messages' list"),
    ("scalar.json", b'"hello"', "expected a JSON object or array at top level"),
    ("not-a-list.json", json.dumps({"messages": "hi"}).encode(), "messages: expected an array"),
    ("empty-session.json", json.dumps({"messages": []}).encode(), "messages: is empty"),
    ("no-user.json", json.dumps(_msgs(("assistant", "hi"))).encode(), "no user message"),
    ("not-utf8.json", b'[{"role": "user", "content": "caf\xe9"}]', "not valid UTF-8"),
    ("huge-message.json", json.dumps(_msgs(("user", "x" * 100_001))).encode(),
     "messages[0].content: 100001 characters exceeds the limit of 100000"),
    ("bad-role.json", json.dumps(_msgs(("user", "a"), ("bot", "b"))).encode(),
     "messages[1].role: expected one of user, assistant, system, got 'bot'"),
    ("missing-role.json", json.dumps([{"content": "a"}]).encode(), "messages[0].role: missing"),
    ("int-content.json", json.dumps([{"role": "user", "content": 42}]).encode(),
     "messages[0].content: expected a string, got number 42"),
    ("nul.json", json.dumps(_msgs(("user", "a\u0000b"))).encode(), "messages[0].content: contains a NUL"),
    ("surrogate.json", b'[{"role": "user", "content": "a\\ud800"}]', "unpaired surrogate"),
    ("bad-id.json", json.dumps({"session_id": "../../x", "messages": _msgs(("user", "a"))}).encode(),
     "session_id: '../../x' is not a valid session id"),
    ("bad stem.json", json.dumps(_msgs(("user", "a"))).encode(), "session_id (from file name)"),
    ("bad-ts.json", json.dumps([{"role": "user", "content": "a", "timestamp": "yesterday"}]).encode(),
     "messages[0].timestamp: expected an ISO-8601 timestamp, got 'yesterday'"),
    ("bool-ts.json", json.dumps([{"role": "user", "content": "a", "timestamp": True}]).encode(),
     "messages[0].timestamp: expected an ISO-8601 string or unix epoch seconds"),
    ("ms-ts.json", json.dumps([{"role": "user", "content": "a", "timestamp": 1.7e15}]).encode(),
     "messages[0].timestamp: unix epoch seconds out of range"),
    ("bad-created.json", json.dumps({"created_at": [], "messages": _msgs(("user", "a"))}).encode(),
     "created_at: expected an ISO-8601 string"),
    ("sharegpt-role.json", json.dumps({"conversations": [{"from": "robot", "value": "a"}]}).encode(),
     "conversations[0].from: expected one of human"),
    ("both.json", json.dumps({"messages": [], "conversations": []}).encode(), "has both"),
    ("bad-user.json", json.dumps({"user_id": 5, "messages": _msgs(("user", "a"))}).encode(),
     "user_id: expected a string"),
]


@pytest.mark.parametrize("name,content,problem", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_file_gives_one_rejection_and_is_untouched(tmp_path, caplog, name, content, problem):
    write_json(tmp_path / "ok.json", GOOD)
    (tmp_path / name).write_bytes(content)
    before = snapshot(tmp_path)

    with caplog.at_level(logging.WARNING, logger="memory.chat_store"):
        result = ChatStore(tmp_path).load_sessions()

    assert [s.session_id for s in result.sessions] == ["good-1"]
    assert len(result.rejected) == 1
    rejection = result.rejected[0]
    assert rejection.path == str(tmp_path / name)
    assert rejection.reason.startswith(f"{tmp_path / name}: ")
    assert problem in rejection.reason
    assert any(problem in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name,content,problem", BAD_FILES[:3], ids=[b[0] for b in BAD_FILES[:3]])
def test_strict_raises_on_first_problem(tmp_path, name, content, problem):
    write_json(tmp_path / "ok.json", GOOD)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ChatFormatError) as info:
        ChatStore(tmp_path).load_sessions(strict=True)
    assert str(info.value).startswith(str(tmp_path / name))
    assert problem in str(info.value)


def test_file_over_size_cap_is_rejected_without_parsing(tmp_path):
    write_json(tmp_path / "ok.json", GOOD)
    write_json(tmp_path / "big.json", _msgs(("user", "x" * 5000)))
    result = ChatStore(tmp_path, max_file_bytes=2000).load_sessions()
    assert [s.session_id for s in result.sessions] == ["good-1"]
    [rejection] = result.rejected
    assert rejection.path == str(tmp_path / "big.json")
    assert "over the 2000-byte limit" in rejection.reason


def test_duplicate_session_id_rejects_second_naming_first(tmp_path):
    first = write_json(tmp_path / "a.json", GOOD)
    second = write_json(tmp_path / "sub" / "b.json", GOOD)
    before = snapshot(tmp_path)
    result = ChatStore(tmp_path).load_sessions()
    assert [s.source_path for s in result.sessions] == [str(first)]
    [rejection] = result.rejected
    assert rejection.path == str(second)
    assert "duplicate session id 'good-1'" in rejection.reason
    assert str(first) in rejection.reason
    assert snapshot(tmp_path) == before
    with pytest.raises(ChatFormatError, match="duplicate"):
        ChatStore(tmp_path).load_sessions(strict=True)


def test_symlinked_file_is_rejected(tmp_path):
    outside = write_json(tmp_path / "outside" / "secret.json", GOOD)
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    os.symlink(outside, store_dir / "link.json")
    result = ChatStore(store_dir).load_sessions()
    assert result.sessions == []
    [rejection] = result.rejected
    assert "symbolic link" in rejection.reason


# --------------------------------------------------------------------------- session ids

@pytest.mark.parametrize("bad", [
    "../../x", "..", "a..b", "/etc/passwd", "a/b", "a\\b", "", ".hidden", "-x", "_x",
    "x" * 129, "ok\n", "a b", "é", "a\x00b", None, 5,
])
def test_invalid_session_ids(bad):
    with pytest.raises(ChatFormatError, match="session_id"):
        validate_session_id(bad)


@pytest.mark.parametrize("good", ["a", "A-1_b.c", "x" * 128, "2024-01-01T10.00"])
def test_valid_session_ids(good):
    assert validate_session_id(good) == good


def test_save_rejects_escaping_session_id(tmp_path):
    store = ChatStore(tmp_path / "a" / "b" / "store")
    before = snapshot(tmp_path)
    for bad in ["../../x", "/tmp/x", "..\\x"]:
        with pytest.raises(ChatFormatError, match="not a valid session id"):
            store.save_session(make_session(session_id=bad))
        with pytest.raises(ChatFormatError):
            store.append_messages(bad, [{"role": "user", "content": "hi"}])
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- limits, timestamps

def test_five_megabyte_message_rejected_fast(tmp_path):
    huge = "y" * (5 * 1024 * 1024)
    start = time.perf_counter()
    with pytest.raises(ChatFormatError, match=r"m\.json: messages\[0\]\.content: .* exceeds the limit"):
        parse_session([{"role": "user", "content": huge}], source="m.json", fallback_session_id="m")
    write_json(tmp_path / "huge.json", [{"role": "user", "content": huge}])
    result = ChatStore(tmp_path).load_sessions()
    elapsed = time.perf_counter() - start
    assert result.sessions == [] and len(result.rejected) == 1
    assert "exceeds the limit of 100000" in result.rejected[0].reason
    assert elapsed < 0.5, elapsed


@pytest.mark.parametrize("value,expected", [
    (0, "1970-01-01T00:00:00+00:00"),
    (1700000000.5, "2023-11-14T22:13:20.500000+00:00"),
    ("2024-01-02T03:04:05", "2024-01-02T03:04:05+00:00"),
    ("2024-01-02T03:04:05Z", "2024-01-02T03:04:05+00:00"),
    ("2024-01-02T03:04:05+02:00", "2024-01-02T01:04:05+00:00"),
    ("2024-01-02", "2024-01-02T00:00:00+00:00"),
])
def test_timestamp_normalisation(value, expected):
    assert normalize_timestamp(value, source="f", field="t") == expected
    session = parse_session([{"role": "user", "content": "hi", "timestamp": value}],
                            source="f.json", fallback_session_id="f")
    assert session.messages[0].timestamp == expected
    assert session.created_at == expected


def test_naive_timestamp_is_utc_whatever_the_local_zone(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert normalize_timestamp("2024-07-01T12:00:00", source="f", field="t") == "2024-07-01T12:00:00+00:00"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_utf8_bom_is_accepted(tmp_path):
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode("utf-8"))
    [session] = ChatStore(tmp_path).load_sessions(strict=True).sessions
    assert session.session_id == "good-1"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e20, "", "soon", "2024-13-01", [], {}])
def test_bad_timestamps(value):
    with pytest.raises(ChatFormatError, match=r"^f: created_at: "):
        normalize_timestamp(value, source="f", field="created_at")


def test_too_many_messages():
    with pytest.raises(ChatFormatError, match="messages: 3 messages exceeds the limit of 2"):
        parse_session(_msgs(("user", "a"), ("user", "b"), ("user", "c")),
                      source="f", fallback_session_id="f", max_messages=2)


def test_error_type_is_value_error_and_picklable():
    err = ChatFormatError("chats/a.json", "messages[3].role", "expected one of user, assistant, system, got 'bot'")
    assert isinstance(err, ValueError)
    assert str(err) == "chats/a.json: messages[3].role: expected one of user, assistant, system, got 'bot'"
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) and copy.field == "messages[3].role"
