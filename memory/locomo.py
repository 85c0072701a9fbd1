"""LoCoMo (Maharana et al., ACL 2024) read in place: conversations into the chat store, the
``observation`` facts as gold memories, the QA items, and LoCoMo's own answer F1.

The file is never copied into the project; pass its path (the benchmarks read
``../shared/benchmarks/locomo/locomo10.json``).

Mapping onto our data model:
- **Users.** Each speaker is a user whose facts we remember. A LoCoMo session becomes one
  chat session per speaker: that speaker's turns are ``user`` messages, the other speaker's
  turns ``assistant`` messages, so extraction (which reads user turns) learns about that
  speaker. Session ids are ``<sample_id>-s<N>-<speaker>``; timestamps are the session's
  date-time (LoCoMo gives "1:56 pm on 8 May, 2023", read as UTC).
- **Images.** A turn that shares an image carries its BLIP caption as text
  (``[shares a photo of ...]``), as LoCoMo's own evaluation does.
- **Gold memories.** ``observation`` facts, each citing the turns (``dia_id``) it came from;
  a gold memory points at its first cited turn in its speaker's session, so the cue builder
  finds the source message.
- **Questions.** Categories 1-4 (5, adversarial, has no answer). A question is *covered*
  when an observation cites one of its evidence turns; retrieval is measured on covered ones.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import json
import re
import string
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

from memory.schema import ChatMessage, ChatSession, MemoryCandidate

CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "locomo" / "locomo10.json"
_DIA = re.compile(r"D\d+:\d+")
_SESSION = re.compile(r"session_(\d+)$")


class LocomoFormatError(ValueError):
    """The file is not LoCoMo-shaped; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class Turn:
    dia_id: str
    speaker: str
    text: str


@dataclasses.dataclass
class LocomoSession:
    number: int
    date_time: str  # ISO-8601 UTC
    turns: List[Turn]


@dataclasses.dataclass(frozen=True)
class GoldFact:
    speaker: str
    session: int
    text: str
    dia_ids: Tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class QAItem:
    question: str
    answer: str
    evidence: Tuple[str, ...]
    category: int


@dataclasses.dataclass
class Conversation:
    sample_id: str
    speakers: Tuple[str, str]
    sessions: List[LocomoSession]
    facts: List[GoldFact]
    qa: List[QAItem]

    def limited(self, max_sessions: Optional[int]) -> "Conversation":
        """The first ``max_sessions`` sessions, with the facts and questions they support."""
        if not max_sessions:
            return self
        keep = {s.number for s in self.sessions[:max_sessions]}
        inside = lambda ids: bool(ids) and all(session_of(i) in keep for i in ids)  # noqa: E731
        return Conversation(self.sample_id, self.speakers, self.sessions[:max_sessions],
                            [f for f in self.facts if f.session in keep],
                            [q for q in self.qa if inside(q.evidence)])

    def cited(self) -> Set[str]:
        return {i for f in self.facts for i in f.dia_ids}

    def questions(self, categories: Sequence[int] = (1, 2, 3, 4), covered_only: bool = True) -> List[QAItem]:
        cited = self.cited()
        return [q for q in self.qa if q.category in categories and (not covered_only or set(q.evidence) & cited)]

    def turn_index(self) -> Dict[str, Tuple[int, int]]:
        """dia_id -> (session number, index of the turn in its session)."""
        return {t.dia_id: (s.number, i) for s in self.sessions for i, t in enumerate(s.turns)}


def session_of(dia_id: str) -> int:
    return int(dia_id[1:].split(":")[0])


def dia_ids(value) -> Tuple[str, ...]:
    """Turn ids from a field that is one id, a list, or ids joined by commas/semicolons/spaces.
    Malformed ids (``"D"``, ``"D:11:26"``) are dropped: they cite nothing."""
    items = value if isinstance(value, list) else [value]
    return tuple(m for item in items if isinstance(item, str) for m in _DIA.findall(item))


def parse_date_time(value: str, *, where: str) -> str:
    """``"1:56 pm on 8 May, 2023"`` -> ``"2023-05-08T13:56:00+00:00"``."""
    try:
        parsed = dt.datetime.strptime(" ".join(str(value).replace(",", " ").split()), "%I:%M %p on %d %B %Y")
    except ValueError as exc:
        raise LocomoFormatError(f"{where}: expected a date-time like '1:56 pm on 8 May, 2023', got {value!r}") from exc
    return parsed.replace(tzinfo=dt.timezone.utc).isoformat()


def _turn_text(turn: dict) -> str:
    text = str(turn.get("text", "")).strip()
    caption = turn.get("blip_caption")
    if caption:
        text = f"{text} [shares {caption}]".strip()
    return text


def _require(obj, key: str, kind, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise LocomoFormatError(f"{where}: missing field {key!r}")
    if not isinstance(obj[key], kind):
        raise LocomoFormatError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, "
                                f"got {type(obj[key]).__name__}")
    return obj[key]


def _parse_conversation(item, file: Path, n: int) -> Conversation:
    where = f"{file}: [{n}]"
    sample_id = _require(item, "sample_id", str, where)
    conv = _require(item, "conversation", dict, where)
    speakers = (_require(conv, "speaker_a", str, f"{where}.conversation"),
                _require(conv, "speaker_b", str, f"{where}.conversation"))
    sessions = []
    for key in sorted((k for k in conv if _SESSION.match(k)), key=lambda k: int(_SESSION.match(k).group(1))):
        number = int(_SESSION.match(key).group(1))
        w = f"{where}.conversation.{key}"
        turns_raw = _require(conv, key, list, f"{where}.conversation")
        date = parse_date_time(_require(conv, f"{key}_date_time", str, f"{where}.conversation"), where=f"{w}_date_time")
        turns = []
        for i, t in enumerate(turns_raw):
            speaker = _require(t, "speaker", str, f"{w}[{i}]")
            ids = dia_ids(_require(t, "dia_id", str, f"{w}[{i}]"))
            if speaker not in speakers:
                raise LocomoFormatError(f"{w}[{i}].speaker: {speaker!r} is neither speaker_a nor speaker_b")
            if len(ids) != 1:
                raise LocomoFormatError(f"{w}[{i}].dia_id: expected one id like 'D1:3'")
            turns.append(Turn(ids[0], speaker, _turn_text(t)))
        sessions.append(LocomoSession(number, date, turns))
    facts = []
    for key, per_speaker in (item.get("observation") or {}).items():
        m = re.match(r"session_(\d+)_observation$", key)
        if not m or not isinstance(per_speaker, dict):
            raise LocomoFormatError(f"{where}.observation.{key}: expected session_N_observation: {{speaker: [...]}}")
        for speaker, entries in per_speaker.items():
            for j, entry in enumerate(entries if isinstance(entries, list) else []):
                if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
                    raise LocomoFormatError(f"{where}.observation.{key}.{speaker}[{j}]: expected [fact, dia_id]")
                ids = dia_ids(entry[1])
                if entry[0].strip() and ids:
                    facts.append(GoldFact(speaker, int(m.group(1)), " ".join(entry[0].split()), ids))
    qa = []
    for j, q in enumerate(item.get("qa") or []):
        w = f"{where}.qa[{j}]"
        category = _require(q, "category", int, w)
        question = _require(q, "question", str, w)
        answer = q.get("answer", q.get("adversarial_answer", ""))
        qa.append(QAItem(question, "" if answer is None else str(answer), dia_ids(q.get("evidence", [])), category))
    return Conversation(sample_id, speakers, sessions, facts, qa)


def load_locomo(path=DEFAULT_PATH) -> List[Conversation]:
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise LocomoFormatError(f"{file}: file not found (LoCoMo is read in place, see docs/BENCHMARKS.md)") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LocomoFormatError(f"{file}: not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(data, list):
        raise LocomoFormatError(f"{file}: expected a JSON list of conversations")
    return [_parse_conversation(item, file, n) for n, item in enumerate(data)]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "speaker"


def user_id(conv: Conversation, speaker: str) -> str:
    return f"{conv.sample_id}:{_slug(speaker)}"


def session_id(conv: Conversation, number: int, speaker: str) -> str:
    return f"{conv.sample_id}-s{number}-{_slug(speaker)}"


def chat_sessions(conv: Conversation) -> List[ChatSession]:
    """Two chat sessions per LoCoMo session, one from each speaker's side."""
    out = []
    for s in conv.sessions:
        for speaker in conv.speakers:
            messages = [ChatMessage("user" if t.speaker == speaker else "assistant", t.text, s.date_time)
                        for t in s.turns if t.text]
            if messages:
                out.append(ChatSession(session_id(conv, s.number, speaker), user_id(conv, speaker), s.date_time, messages))
    return out


def gold_candidates(conv: Conversation, bank_user: Optional[str] = None) -> List[Tuple[MemoryCandidate, Tuple[str, ...]]]:
    """The observation facts as memory candidates with their cited turns. ``bank_user``: one
    user id for the whole conversation (a bank shared by both speakers); by default each
    fact belongs to its speaker. Each candidate points at its first cited turn, in its own
    speaker's chat session, when that turn is a message there."""
    index = conv.turn_index()
    dates = {s.number: s.date_time for s in conv.sessions}
    out = []
    for f in conv.facts:
        speaker = f.speaker if f.speaker in conv.speakers else conv.speakers[0]
        sid, pos = None, None
        if f.dia_ids[0] in index:
            number, pos = index[f.dia_ids[0]]
            sid = session_id(conv, number, speaker)
        out.append((MemoryCandidate(text=f.text, user_id=bank_user or user_id(conv, speaker), session_id=sid,
                                    message_index=pos, timestamp=dates.get(f.session), source="import"), f.dia_ids))
    return out


# ---------------------------------------------------------------- LoCoMo's answer F1
def normalize_answer(text: str) -> str:
    """LoCoMo's normalisation: drop commas, lower-case, drop punctuation and the words
    a/an/the/and, collapse whitespace."""
    text = str(text).replace(",", "").lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the|and)\b", " ", text)
    return " ".join(text.split())


def _stem(words: List[str]) -> List[str]:
    from nltk.stem import PorterStemmer  # requirements-bench.txt

    stemmer = _stem.__dict__.setdefault("stemmer", PorterStemmer())
    return [stemmer.stem(w) for w in words]


def token_f1(prediction: str, truth: str) -> float:
    pred, gold = _stem(normalize_answer(prediction).split()), _stem(normalize_answer(truth).split())
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def answer_f1(prediction: str, answer: str, category: int) -> float:
    """Per category as LoCoMo scores it: multi-hop answers are comma-separated parts, each
    matched by its best predicted part and averaged; open-domain keeps the answer before
    ';'; temporal and single-hop are one token F1."""
    if category == 3:
        answer = answer.split(";")[0].strip()
    if category == 1:
        preds = [p for p in prediction.split(",") if p.strip()] or [prediction]
        parts = [a for a in answer.split(",") if a.strip()] or [answer]
        return sum(max(token_f1(p, a) for p in preds) for a in parts) / len(parts)
    return token_f1(prediction, answer)


# ---------------------------------------------------------------- BM25 (the lexical peer)
_TOKEN = re.compile(r"[a-z0-9]+")
_STOP = frozenset("a an the and or of to in on at for with is are was were be been do does did what when where "
                  "who whom which why how i me my you your he she her his it its they them their".split())


def bm25_tokens(text: str) -> List[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in _STOP]


class BM25:
    """Okapi BM25 (k1 1.5, b 0.75) over a fixed list of documents."""

    def __init__(self, documents: Sequence[str], k1: float = 1.5, b: float = 0.75):
        import math

        self.docs = [collections.Counter(bm25_tokens(d)) for d in documents]
        self.lengths = [sum(d.values()) for d in self.docs]
        self.avg = sum(self.lengths) / max(len(self.docs), 1) or 1.0
        df = collections.Counter(t for d in self.docs for t in d)
        n = len(self.docs)
        self.idf = {t: math.log(1 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}
        self.k1, self.b = k1, b

    def scores(self, query: str) -> List[float]:
        terms = bm25_tokens(query)
        out = []
        for doc, length in zip(self.docs, self.lengths):
            s = 0.0
            for t in terms:
                tf = doc.get(t, 0)
                if tf:
                    s += self.idf[t] * tf * (self.k1 + 1) / (tf + self.k1 * (1 - self.b + self.b * length / self.avg))
            out.append(s)
        return out
