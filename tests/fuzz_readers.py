"""Property-based fuzzing of every reader of user files (shared by tests/test_fuzz.py, with a
fixed-seed budget, and bench/fuzz_readers.py, with a long one).

Each reader, given random or adversarial bytes, must either parse or raise its own format
error naming the file; never another exception, and never write anything."""
from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

KEYS = ["session_id", "user_id", "messages", "conversations", "role", "content", "from", "value", "created_at",
        "timestamp", "title", "text", "prompt", "completion", "instruction", "output", "input", "question",
        "expected", "id", "date", "meta", "metadata", "message_index"]
ROLES = ["user", "assistant", "system", "human", "gpt", "tool", "USER", ""]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40), st.sampled_from(ROLES),
                    st.sampled_from(["2026-01-01T10:00:00Z", "2026-13-45", "yesterday", "1700000000", "-1e300"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=6)), max_leaves=25)
messages = st.lists(st.dictionaries(st.sampled_from(["role", "content", "from", "value", "timestamp"]),
                                    st.one_of(st.sampled_from(ROLES), scalars), max_size=4), max_size=6)
sessions = st.fixed_dictionaries({}, optional={"session_id": scalars, "user_id": scalars, "messages": messages,
                                               "conversations": messages, "created_at": scalars})
documents = st.one_of(values, sessions, st.lists(sessions, max_size=3), messages)


def _encode(doc, mode: int) -> bytes:
    text = json.dumps(doc, allow_nan=True)
    if mode == 1:  # truncated
        return text[: len(text) // 2].encode()
    if mode == 2:  # not UTF-8
        return b"\xff\xfe" + text.encode("utf-16-le")
    return text.encode()


raw_bytes = st.one_of(st.builds(_encode, documents, st.integers(0, 2)), st.binary(max_size=200),
                      st.text(alphabet=string.printable, max_size=200).map(str.encode))
jsonl_bytes = st.lists(st.one_of(st.builds(lambda d: json.dumps(d, allow_nan=True), documents),
                                 st.text(max_size=60)), max_size=5).map(lambda lines: "\n".join(lines).encode()) | \
    st.binary(max_size=120)
yaml_bytes = st.one_of(
    st.dictionaries(st.sampled_from(["seed", "decode_epochs", "learning_rate", "k_folds", "stage", "replay_ratio",
                                     "keep_versions", "schedule_every", "schedule_at", "secret_filter",
                                     "extraction_unit", "precision", "cue_questions", "not_an_option"]),
                    scalars, max_size=4).map(lambda d: json.dumps(d, allow_nan=True).encode()),
    st.text(alphabet=string.printable, max_size=120).map(str.encode), st.binary(max_size=80))


def _snapshot(directory: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


def _check(reader, data: bytes, errors, name: str = "input.json"):
    """Run ``reader(path)`` on ``data``: a parse, or one of ``errors`` naming the file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        before = _snapshot(Path(tmp))
        try:
            reader(path)
        except errors as exc:
            assert str(path) in str(exc) or path.name in str(exc), f"error does not name the file: {exc}"
        assert _snapshot(Path(tmp)) == before, "a reader wrote or changed a file"


def _property(strategy, setup, name: str):
    """A hypothesis property: ``setup()`` returns ``(reader, errors)``; every input drawn from
    ``strategy`` must parse or raise one of ``errors`` naming the file."""
    def make(max_examples: int, derandomize: bool = True):
        reader, errors = setup()

        @settings(max_examples=max_examples, derandomize=derandomize, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def prop(data):
            _check(reader, data, errors, name)

        return prop

    return make


def _chat_reader():
    from memory.chat_store import ChatFormatError, ChatStore

    def read(path):
        with tempfile.TemporaryDirectory() as store_dir:
            ChatStore(store_dir).read_session_file(path)
    return read, ChatFormatError


def _memories_reader():
    from memory.chat_store import ChatFormatError
    from memory.import_memories import read_memories_jsonl
    return read_memories_jsonl, ChatFormatError


def _sft_reader():
    from memory.sft_data import SFTFormatError, read_sft_jsonl
    return read_sft_jsonl, SFTFormatError


def _questions_reader():
    from memory.evaluation import QuestionsFormatError, load_questions
    return load_questions, QuestionsFormatError


def _config_reader():
    """A config YAML: parsed with every option of its declared type, or a ValueError naming
    the file (argparse's own usage error, exit 2, counts as clear too)."""
    import dataclasses
    import typing

    from memory.config import parse_args

    def typed(obj):
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value, hint = getattr(obj, f.name), hints.get(f.name)
            if hint in (int, float, str, bool) and value is not None:
                assert isinstance(value, hint) or (hint is float and isinstance(value, int)), \
                    f"{f.name}: {value!r} is not {hint.__name__}"

    def read(path):
        try:
            parsed = parse_args(["--config", str(path)])
        except SystemExit as exc:
            assert exc.code == 2
            return
        for obj in parsed:
            typed(obj)
    return read, ValueError


PROPERTIES = {"chat files": _property(raw_bytes, _chat_reader, "input.json"),
              "memories JSONL": _property(jsonl_bytes, _memories_reader, "memories.jsonl"),
              "SFT JSONL": _property(jsonl_bytes, _sft_reader, "sft.jsonl"),
              "questions JSON": _property(raw_bytes, _questions_reader, "questions.json"),
              "config YAML": _property(yaml_bytes, _config_reader, "config.yaml")}
