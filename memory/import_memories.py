"""``--memories FILE.jsonl``: memory entries imported as if extracted (same de-duplication).

One JSON object per line: ``{"text": str, "user_id"?: str, "created_at"?: ISO-8601 | unix seconds,
"session_id"?: str, "message_index"?: int}``. The last two, given together, name the chat message
the fact was said in (a session of the chat store, 0-based), as extraction records it: step 1
then trains on that message as the memory's source cue, as it does for extracted facts.
Lines written by ``python -m memory export`` read back as they are: its ``said_at`` wins over
its ``created_at`` (the time the record was stored), and its other keys are ignored.
Blank lines are skipped; anything else wrong is an error naming the file, line and field.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

from memory.chat_store import ChatFormatError, normalize_timestamp, validate_session_id
from memory.schema import MemoryCandidate

MAX_MEMORY_CHARS = 2000


def read_memories_jsonl(path, default_user_id: str = "default") -> List[MemoryCandidate]:
    file = Path(path)
    if not file.is_file():
        raise ChatFormatError(str(file), None, "memories file not found")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ChatFormatError(str(file), None, f"not UTF-8: {exc}") from exc
    out = []
    for no, line in enumerate(lines, 1):
        if line.strip():
            out.append(_parse_line(line, f"{file}:{no}", default_user_id))
    return out


def _parse_line(line: str, where: str, default_user_id: str) -> MemoryCandidate:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ChatFormatError(where, None, f"invalid JSON: {exc.msg}") from exc
    if not isinstance(item, dict):
        raise ChatFormatError(where, None, f"expected an object, got {type(item).__name__}")
    text = item.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ChatFormatError(where, "text", "expected a non-empty string")
    if len(text) > MAX_MEMORY_CHARS:
        raise ChatFormatError(where, "text", f"longer than {MAX_MEMORY_CHARS} characters")
    user = item.get("user_id", default_user_id)
    if not isinstance(user, str) or not user.strip():
        raise ChatFormatError(where, "user_id", "expected a non-empty string")
    # ``python -m memory export`` writes when the fact was said as "said_at" ("created_at" there is
    # when the record was stored), so an export read back keeps the time the user said it
    field = "said_at" if item.get("said_at") is not None else "created_at"
    ts = item.get(field)
    ts = normalize_timestamp(ts, source=where, field=field) if ts is not None else None
    session_id, index = item.get("session_id"), item.get("message_index")
    if (session_id is None) != (index is None):
        missing = "message_index" if index is None else "session_id"
        raise ChatFormatError(where, missing, "session_id and message_index go together: give both or neither")
    if session_id is not None:
        validate_session_id(session_id, source=where)
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ChatFormatError(where, "message_index", f"expected an integer >= 0, got {index!r}")
    return MemoryCandidate(text=" ".join(text.split()), user_id=user, session_id=session_id, message_index=index,
                           timestamp=ts, source="import")
