"""Chat sessions on disk: step 0 (save them as JSON) and step 1 (load them for training).

One session per ``<store>/<session_id>.json`` file, written in the canonical format::

    {"session_id": "...", "user_id": "...", "created_at": "<ISO-8601>",
     "messages": [{"role": "user"|"assistant"|"system", "content": "...", "timestamp"?: "..."}]}

Readers also accept a bare list of messages (session id = file stem) and ShareGPT
(``{"conversations": [{"from": "human", "value": "..."}], "id"?: ...}``); writers only
write the canonical format.

Loading is read-only: a bad file becomes one ``Rejection`` (and a WARNING log line) and
is left exactly where it is, so a person can fix it; ``strict=True`` raises instead.

Writes are atomic (temp dotfile in the same directory, fsync, ``os.replace``), so a
concurrent reader sees the old file or the new one, never half of one. There is no
locking: two writers appending to the *same* session can lose one another's update.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import json
import logging
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from memory.fileio import atomic_write_json
from memory.schema import ROLES, ChatMessage, ChatSession

logger = logging.getLogger(__name__)

MAX_FILE_BYTES = 32 * 1024 * 1024
MAX_MESSAGE_CHARS = 100_000
MAX_MESSAGES = 100_000
MAX_USER_ID_CHARS = 128

_SESSION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SESSION_ID_RULE = (
    "expected 1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, "
    "without '..'"
)
_SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant", "model": "assistant",
    "system": "system",
}

Timestampish = Union[str, int, float, dt.datetime]


class ChatFormatError(ValueError):
    """A chat file or session is invalid; the message names the file and the field."""

    def __init__(self, source: str, field: Optional[str], problem: str):
        self.source, self.field, self.problem = str(source), field, problem
        where = f"{self.source}: {field}" if field else self.source
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # keep it picklable (multiprocessing) despite the custom __init__
        return (type(self), (self.source, self.field, self.problem))


@dataclasses.dataclass
class Rejection:
    path: str
    reason: str


@dataclasses.dataclass
class LoadResult:
    sessions: List[ChatSession] = dataclasses.field(default_factory=list)
    rejected: List[Rejection] = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------- validation

def _describe(value: Any) -> str:
    """Short, JSON-flavoured description of a bad value for an error message."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:60]) + f"... ({len(value)} chars)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {json.dumps(value)}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def validate_session_id(session_id: Any, *, source: str = "<session>", field: str = "session_id") -> str:
    """Return ``session_id`` if it is safe to use as a file name inside the store.

    The pattern has no ``/``, ``\\`` or leading ``.``, and ``..`` is refused outright, so
    ``<store>/<session_id>.json`` can never point outside the store directory.
    """
    if not isinstance(session_id, str):
        raise ChatFormatError(source, field, f"expected a string, got {_describe(session_id)}")
    if not _SESSION_ID_RE.fullmatch(session_id) or ".." in session_id:
        raise ChatFormatError(
            source, field, f"{_describe(session_id)} is not a valid session id: {_SESSION_ID_RULE}"
        )
    return session_id


def _check_text(value: Any, *, source: str, field: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise ChatFormatError(source, field, f"expected a string, got {_describe(value)}")
    # Length first: O(1), so a 5 MB message is refused before anything scans it.
    if len(value) > max_chars:
        raise ChatFormatError(
            source, field, f"{len(value)} characters exceeds the limit of {max_chars}"
        )
    if "\x00" in value:
        raise ChatFormatError(source, field, f"contains a NUL character at {value.index(chr(0))}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # lone surrogate from a "\ud800" JSON escape
        raise ChatFormatError(
            source, field, f"contains an unpaired surrogate at character {err.start}"
        ) from None
    return value


def normalize_timestamp(value: Any, *, source: str, field: str) -> str:
    """ISO-8601 string or unix epoch seconds -> ISO-8601 in UTC (naive input means UTC)."""
    if isinstance(value, dt.datetime):
        when = value
    elif isinstance(value, str):
        when = _parse_iso(value, source=source, field=field)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        when = _from_epoch(value, source=source, field=field)
    else:
        raise ChatFormatError(
            source, field,
            f"expected an ISO-8601 string or unix epoch seconds, got {_describe(value)}",
        )
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.astimezone(dt.timezone.utc).isoformat()


def _parse_iso(value: str, *, source: str, field: str) -> dt.datetime:
    try:
        if len(value) > 64:
            raise ValueError("too long")
        return dt.datetime.fromisoformat(value)
    except ValueError:
        raise ChatFormatError(
            source, field, f"expected an ISO-8601 timestamp, got {_describe(value)}"
        ) from None


def _from_epoch(value: float, *, source: str, field: str) -> dt.datetime:
    try:
        if not math.isfinite(value):
            raise ValueError("not finite")
        return dt.datetime.fromtimestamp(value, tz=dt.timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise ChatFormatError(
            source, field,
            f"unix epoch seconds out of range (milliseconds?), got {_describe(value)}",
        ) from None


# --------------------------------------------------------------------------- parsing

def parse_session(
    data: Any,
    *,
    source: str,
    default_user_id: str = "default",
    fallback_session_id: Optional[str] = None,
    fallback_created_at: Optional[Timestampish] = None,
    max_message_chars: int = MAX_MESSAGE_CHARS,
    max_messages: int = MAX_MESSAGES,
) -> ChatSession:
    """Validate decoded JSON in any accepted shape and return a normalised ``ChatSession``.

    ``source`` names the file in error messages; ``fallback_session_id`` is normally the
    file stem and ``fallback_created_at`` the file mtime. Raises ``ChatFormatError``.
    """
    meta, raw_messages, list_field, sharegpt = _split_shape(data, source)
    session_id = _session_id_from(meta, sharegpt, fallback_session_id, source)
    user_id = _user_id_from(meta, default_user_id, source)
    messages = _parse_messages(
        raw_messages, source=source, list_field=list_field, sharegpt=sharegpt,
        max_chars=max_message_chars, max_messages=max_messages,
    )
    created_at = _created_at_from(meta, messages, fallback_created_at, source)
    return ChatSession(session_id, user_id, created_at, messages, source_path=source)


def _split_shape(data: Any, source: str) -> Tuple[dict, Any, str, bool]:
    """-> (metadata dict, raw message list, name of that list's field, is ShareGPT)."""
    if isinstance(data, list):
        return {}, data, "messages", False
    if not isinstance(data, dict):
        raise ChatFormatError(
            source, None, f"expected a JSON object or array at top level, got {_describe(data)}"
        )
    has_messages, has_conversations = "messages" in data, "conversations" in data
    if has_messages and has_conversations:
        raise ChatFormatError(source, None, "has both 'messages' and 'conversations'; expected one")
    if has_messages:
        return data, data["messages"], "messages", False
    if has_conversations:
        return data, data["conversations"], "conversations", True
    raise ChatFormatError(
        source, None,
        "expected an object with a 'messages' list (canonical) or a 'conversations' list "
        "(ShareGPT), or a bare list of messages",
    )


def _session_id_from(meta: dict, sharegpt: bool, fallback: Optional[str], source: str) -> str:
    key = "id" if sharegpt else "session_id"
    value = meta.get(key)
    if value is None:
        if fallback is None:
            raise ChatFormatError(source, key, "missing, and no file name to fall back on")
        return validate_session_id(fallback, source=source, field="session_id (from file name)")
    if sharegpt and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return validate_session_id(value, source=source, field=key)


def _user_id_from(meta: dict, default_user_id: str, source: str) -> str:
    value = meta.get("user_id")
    value = default_user_id if value is None else value
    _check_text(value, source=source, field="user_id", max_chars=MAX_USER_ID_CHARS)
    if not value.strip():
        raise ChatFormatError(source, "user_id", "is empty")
    return value


def _parse_messages(
    raw: Any, *, source: str, list_field: str, sharegpt: bool, max_chars: int, max_messages: int
) -> List[ChatMessage]:
    if not isinstance(raw, list):
        raise ChatFormatError(source, list_field, f"expected an array of messages, got {_describe(raw)}")
    if not raw:
        raise ChatFormatError(source, list_field, "is empty; a session needs at least one message")
    if len(raw) > max_messages:
        raise ChatFormatError(
            source, list_field, f"{len(raw)} messages exceeds the limit of {max_messages}"
        )
    messages = [
        _parse_message(item, where=f"{list_field}[{i}]", source=source, sharegpt=sharegpt,
                       max_chars=max_chars)
        for i, item in enumerate(raw)
    ]
    if not any(m.role == "user" and m.content.strip() for m in messages):
        raise ChatFormatError(source, list_field, "no user message with non-empty content")
    return messages


def _parse_message(item: Any, *, where: str, source: str, sharegpt: bool, max_chars: int) -> ChatMessage:
    if not isinstance(item, dict):
        raise ChatFormatError(source, where, f"expected a message object, got {_describe(item)}")
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    for key in (role_key, content_key):
        if key not in item:
            raise ChatFormatError(source, f"{where}.{key}", "missing")
    role = _parse_role(item[role_key], field=f"{where}.{role_key}", source=source, sharegpt=sharegpt)
    content = _check_text(item[content_key], source=source, field=f"{where}.{content_key}",
                          max_chars=max_chars)
    timestamp = item.get("timestamp")
    if timestamp is not None:
        timestamp = normalize_timestamp(timestamp, source=source, field=f"{where}.timestamp")
    return ChatMessage(role=role, content=content, timestamp=timestamp)


def _parse_role(value: Any, *, field: str, source: str, sharegpt: bool) -> str:
    if sharegpt:
        role = _SHAREGPT_ROLES.get(value.lower()) if isinstance(value, str) else None
        allowed = ", ".join(_SHAREGPT_ROLES)
    else:
        role = value if value in ROLES else None
        allowed = ", ".join(ROLES)
    if role is None:
        raise ChatFormatError(source, field, f"expected one of {allowed}, got {_describe(value)}")
    return role


def _created_at_from(
    meta: dict, messages: List[ChatMessage], fallback: Optional[Timestampish], source: str
) -> str:
    if meta.get("created_at") is not None:
        return normalize_timestamp(meta["created_at"], source=source, field="created_at")
    first = next((m.timestamp for m in messages if m.timestamp), None)
    if first is not None:
        return first
    if fallback is not None:
        return normalize_timestamp(fallback, source=source, field="created_at (fallback)")
    return dt.datetime.now(dt.timezone.utc).isoformat()


# --------------------------------------------------------------------------- files

def _read_capped(path: Path, max_bytes: int) -> Tuple[bytes, float]:
    """-> (bytes, mtime) of a regular file, refusing symlinks, FIFOs and oversized files."""
    source = str(path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ChatFormatError(source, None, "is a symbolic link; not followed") from None
        raise ChatFormatError(source, None, f"cannot open: {err.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ChatFormatError(source, None, "is not a regular file")
        if info.st_size > max_bytes:
            raise ChatFormatError(
                source, None, f"file is {info.st_size} bytes, over the {max_bytes}-byte limit"
            )
        raw = handle.read(max_bytes + 1)
    if len(raw) > max_bytes:  # grew between fstat and read
        raise ChatFormatError(source, None, f"file is over the {max_bytes}-byte limit")
    return raw, info.st_mtime


def _decode_json(raw: bytes, source: str) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ChatFormatError(
            source, None, f"not valid UTF-8 (bad byte 0x{raw[err.start]:02x} at offset {err.start})"
        ) from None
    text = text.removeprefix("\ufeff")  # BOM from some Windows editors
    if not text.strip():
        raise ChatFormatError(source, None, "file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ChatFormatError(
            source, None, f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from None
    except RecursionError:
        raise ChatFormatError(source, None, "malformed JSON: nested too deeply") from None


def _is_chat_file(name: str) -> bool:
    # Temp files of in-progress writes are ".<name>.json.<random>.tmp": dotfiles, not *.json.
    return name.endswith(".json") and not name.startswith(".")


def _session_order(session: ChatSession) -> Tuple[dt.datetime, str]:
    return dt.datetime.fromisoformat(session.created_at), session.session_id


def _message_dict(message: Union[ChatMessage, dict], now: str) -> dict:
    if isinstance(message, ChatMessage):
        data = message.to_dict()
    elif isinstance(message, dict):
        data = dict(message)
    else:
        raise TypeError(f"expected ChatMessage or dict, got {type(message).__name__}")
    if data.get("timestamp") is None:
        data["timestamp"] = now
    return data


# --------------------------------------------------------------------------- the store

class ChatStore:
    """A directory of chat session files: ``<directory>/<session_id>.json``."""

    def __init__(
        self,
        directory: Union[str, os.PathLike],
        *,
        default_user_id: str = "default",
        max_file_bytes: int = MAX_FILE_BYTES,
        max_message_chars: int = MAX_MESSAGE_CHARS,
        max_messages: int = MAX_MESSAGES,
    ):
        self.directory = Path(directory)
        self.default_user_id = default_user_id
        self.max_file_bytes = max_file_bytes
        self.max_message_chars = max_message_chars
        self.max_messages = max_messages
        self._ensure_directory()

    def _ensure_directory(self) -> None:
        try:
            self.directory.mkdir(parents=True, mode=0o700)
        except FileExistsError:
            if not self.directory.is_dir():
                raise NotADirectoryError(
                    f"{self.directory}: chat store path exists and is not a directory"
                ) from None
            return
        os.chmod(self.directory, 0o700)  # mkdir's mode is filtered by the umask

    # ---- paths and parsing

    def path_for(self, session_id: str) -> Path:
        """``<directory>/<session_id>.json``; the id is validated, so it cannot escape."""
        validate_session_id(session_id, source=str(self.directory))
        return self.directory / f"{session_id}.json"

    def parse(self, data: Any, *, source: str, **fallbacks: Any) -> ChatSession:
        return parse_session(
            data, source=source, default_user_id=self.default_user_id,
            max_message_chars=self.max_message_chars, max_messages=self.max_messages,
            **fallbacks,
        )

    def read_session_file(self, path: Union[str, os.PathLike]) -> ChatSession:
        """Read and validate one file (any accepted shape); raises ``ChatFormatError``."""
        path = Path(path)
        raw, mtime = _read_capped(path, self.max_file_bytes)
        data = _decode_json(raw, str(path))
        return self.parse(data, source=str(path), fallback_session_id=path.stem,
                          fallback_created_at=mtime)

    # ---- writing

    def save_session(self, session: ChatSession) -> Path:
        """Validate ``session`` and write it atomically in canonical form; returns the path."""
        path = self.path_for(session.session_id)
        checked = self.parse(session.to_dict(), source=str(path))
        atomic_write_json(path, checked.to_dict())
        logger.debug("saved session %s (%d messages) to %s",
                     checked.session_id, len(checked.messages), path)
        return path

    def append_messages(
        self,
        session_id: str,
        messages: Iterable[Union[ChatMessage, dict]],
        *,
        user_id: Optional[str] = None,
        created_at: Optional[Timestampish] = None,
    ) -> ChatSession:
        """Load ``<session_id>.json`` (or start a new session), append, save atomically.

        Messages without a timestamp get the current time. ``user_id`` must match an
        existing session's; a corrupt existing file raises rather than being overwritten.
        """
        path = self.path_for(session_id)
        existing = self._load_for_append(path, session_id, user_id)
        now = dt.datetime.now(dt.timezone.utc).isoformat()
        new = [_message_dict(m, now) for m in messages]
        if not new:
            raise ValueError(f"{path}: append_messages called with no messages")
        data = {
            "session_id": session_id,
            "user_id": existing.user_id if existing else (
                user_id if user_id is not None else self.default_user_id),
            "created_at": existing.created_at if existing else created_at,
            "messages": ([m.to_dict() for m in existing.messages] if existing else []) + new,
        }
        session = self.parse(data, source=str(path))
        atomic_write_json(path, session.to_dict())
        return session

    def _load_for_append(self, path: Path, session_id: str, user_id: Optional[str]) -> Optional[ChatSession]:
        if not os.path.lexists(path):
            return None
        existing = self.read_session_file(path)
        if existing.session_id != session_id:
            raise ChatFormatError(str(path), "session_id",
                                  f"file holds session {existing.session_id!r}, not {session_id!r}")
        if user_id is not None and existing.user_id != user_id:
            raise ChatFormatError(str(path), "user_id",
                                  f"session belongs to {existing.user_id!r}, not {user_id!r}")
        return existing

    # ---- loading

    def list_files(self) -> Tuple[List[Path], List[ChatFormatError]]:
        """Sorted ``*.json`` files under the directory (recursive, no dotfiles/dot-dirs),
        plus one error per directory that could not be listed or is a symlink."""
        found: List[Path] = []
        errors: List[ChatFormatError] = []

        def on_error(err: OSError) -> None:
            errors.append(ChatFormatError(err.filename, None, f"cannot list directory: {err.strerror}"))

        for root, dirs, files in os.walk(self.directory, onerror=on_error, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in dirs:
                if os.path.islink(os.path.join(root, name)):
                    errors.append(ChatFormatError(os.path.join(root, name), None,
                                                  "is a symbolic link to a directory; not followed"))
            found.extend(Path(root) / name for name in files if _is_chat_file(name))
            for name in files:  # named like a session but not read: say so, never skip in silence
                if not _is_chat_file(name) and name.lower().endswith(".json") and not name.startswith("."):
                    logger.warning("%s: not read (chat session files end in lower-case .json)", Path(root) / name)
            for name in dirs:
                if name.lower().endswith(".json"):
                    logger.warning("%s: a directory named like a session file; its *.json files are read as "
                                   "sessions", Path(root) / name)
        found.sort(key=lambda p: p.relative_to(self.directory).parts)
        return found, errors

    def load_sessions(self, strict: bool = False) -> LoadResult:
        """Load every valid session, sorted by (created_at, session_id).

        Each bad file gives one ``Rejection`` (logged at WARNING) and is left untouched;
        with ``strict=True`` the first problem raises ``ChatFormatError``.
        """
        result = LoadResult()
        paths, errors = self.list_files()
        for err in errors:
            self._reject(result, err, strict)
        first_seen: Dict[str, str] = {}
        for path in paths:
            try:
                session = self.read_session_file(path)
                _check_unique(session, first_seen, path)
            except ChatFormatError as err:
                self._reject(result, err, strict)
                continue
            first_seen[session.session_id] = str(path)
            result.sessions.append(session)
        result.sessions.sort(key=_session_order)
        logger.info("loaded %d chat sessions from %s, rejected %d files",
                    len(result.sessions), self.directory, len(result.rejected))
        return result

    @staticmethod
    def _reject(result: LoadResult, err: ChatFormatError, strict: bool) -> None:
        if strict:
            raise err
        logger.warning("rejected chat file: %s", err)
        result.rejected.append(Rejection(path=err.source, reason=str(err)))


def _check_unique(session: ChatSession, first_seen: Dict[str, str], path: Path) -> None:
    if session.session_id in first_seen:
        raise ChatFormatError(
            str(path), "session_id",
            f"duplicate session id {session.session_id!r}, already loaded from "
            f"{first_seen[session.session_id]}",
        )
