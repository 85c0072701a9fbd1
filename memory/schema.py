"""Plain data types shared across the memory layer.

These are deliberately dumb dataclasses: validation lives at the boundaries
(``memory.chat_store`` for chat files, ``memory.vector_db`` for records).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import List, Optional

ROLES = ("user", "assistant", "system")


@dataclasses.dataclass
class ChatMessage:
    role: str  # one of ROLES
    content: str
    timestamp: Optional[str] = None  # ISO-8601, UTC when known

    def to_dict(self) -> dict:
        d = {"role": self.role, "content": self.content}
        if self.timestamp is not None:
            d["timestamp"] = self.timestamp
        return d


@dataclasses.dataclass
class ChatSession:
    session_id: str
    user_id: str
    created_at: str  # ISO-8601
    messages: List[ChatMessage]
    source_path: Optional[str] = None  # file it was read from, for error messages and provenance

    def to_dict(self) -> dict:
        return {
            "session_id": self.session_id,
            "user_id": self.user_id,
            "created_at": self.created_at,
            "messages": [m.to_dict() for m in self.messages],
        }

    def content_hash(self) -> str:
        """Hash of the normalised content: a changed session gets a new hash."""
        blob = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclasses.dataclass
class MemoryCandidate:
    """A fact proposed by extraction (or an import), before de-duplication."""

    text: str
    user_id: str
    session_id: Optional[str] = None
    message_index: Optional[int] = None
    timestamp: Optional[str] = None  # when the user said it
    source: str = "extraction"  # "extraction" | "import" | "manual"
