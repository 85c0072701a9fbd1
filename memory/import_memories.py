"""``--memories FILE.jsonl``: memory entries imported as if extracted (same de-duplication).

One JSON object per line: ``{"text": str, "user_id"?: str, "created_at"?: ISO-8601 | unix seconds}``.
Blank lines are skipped; anything else wrong is an error naming the file, line and field.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

from memory.chat_store import ChatFormatError, normalize_timestamp
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
    ts = item.get("created_at")
    ts = normalize_timestamp(ts, source=where, field="created_at") if ts is not None else None
    return MemoryCandidate(text=" ".join(text.split()), user_id=user, timestamp=ts, source="import")
