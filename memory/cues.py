"""Cues: contexts that should make ``<recall>`` retrieve a memory (step-1 training data).

Per memory:
- ``text``: the memory's own text;
- ``source``: the user message it was extracted from;
- ``question``: N questions the base model writes about the fact, kept only when they
  pass a sanity filter (a question, 3-25 words, not a copy of the fact, no "the user");
- ``template``: questions made by rule from the fact (``memory.questions``), not stored.

Generated cues are stored with the memory in the DB (``kind<TAB>text`` strings), so a
rerun does not generate them again.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import re
from typing import Dict, List, Optional, Sequence

import torch

from memory.chat_store import ChatStore
from memory.questions import template_cues
from memory.secrets import log_filtered
from memory.token_manager import safe_chat_template
from memory.vector_db import MemoryRecord, MemoryVectorDB

logger = logging.getLogger(__name__)

QUESTION_SYSTEM = ("Write one short question that the user could ask to get this fact back. "
                   "Ask in the first person, with I, me or my.")
QUESTION_FEW_SHOT = [
    ("The user has a cat named Luna.", "What is my cat called?"),
    ("The user works as a chef.", "What do I do for a living?"),
]
_WS = re.compile(r"\s+")


@dataclasses.dataclass(frozen=True)
class Cue:
    kind: str  # "text" | "source" | "question"
    text: str

    def encode(self) -> str:
        return f"{self.kind}\t{self.text}"

    @staticmethod
    def decode(raw: str) -> "Cue":
        kind, _, text = raw.partition("\t")
        return Cue(kind, text) if text else Cue("question", kind)


def clean(text: str) -> str:
    return _WS.sub(" ", text).strip()


def is_good_question(question: str, fact: str) -> bool:
    q = clean(question)
    words = q.split()
    return (q.endswith("?") and 3 <= len(words) <= 25 and "user" not in q.lower()
            and q.lower().rstrip("?") != fact.lower().rstrip(".") and "\n" not in q)


def _question_prompt(tokenizer, fact: str) -> str:
    messages = [{"role": "system", "content": QUESTION_SYSTEM}]
    for f, q in QUESTION_FEW_SHOT:
        messages += [{"role": "user", "content": f"Fact: {f}"}, {"role": "assistant", "content": q}]
    messages.append({"role": "user", "content": f"Fact: {fact}"})
    return safe_chat_template(tokenizer, messages, add_generation_prompt=True)


@torch.no_grad()
def generate_questions(model, tokenizer, facts: Sequence[str], n: int = 3, batch_size: int = 16,
                       seed: int = 0, max_new_tokens: int = 32) -> List[List[str]]:
    """Up to ``n`` distinct, filtered questions per fact (sampled; seeded)."""
    device = next(model.parameters()).device
    out: List[List[str]] = []
    torch.manual_seed(seed)
    for start in range(0, len(facts), batch_size):
        chunk = list(facts[start:start + batch_size])
        enc = tokenizer([_question_prompt(tokenizer, f) for f in chunk], return_tensors="pt", padding=True,
                        padding_side="left", add_special_tokens=False).to(device)
        gen = model.generate(**enc, do_sample=True, temperature=0.8, top_p=0.95, num_return_sequences=n,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, fact in enumerate(chunk):
            kept: List[str] = []
            for q in (clean(t.split("\n")[0]) for t in texts[i * n:(i + 1) * n]):
                if is_good_question(q, fact) and q not in kept:
                    kept.append(q)
            out.append(kept)
    return out


def source_text(store: ChatStore, record: MemoryRecord, cache: Dict[str, object]) -> Optional[str]:
    """The user message a memory came from, if the session is still in the store."""
    if record.session_id is None or record.message_index is None:
        return None
    if record.session_id not in cache:
        path = store.path_for(record.session_id)
        try:
            cache[record.session_id] = store.read_session_file(path) if path.is_file() else None
        except ValueError:
            cache[record.session_id] = None
    session = cache[record.session_id]
    if session is None or record.message_index >= len(session.messages):
        return None
    return clean(session.messages[record.message_index].content)


def memory_cues(records: Sequence[MemoryRecord], templates: bool = True) -> Dict[int, List[Cue]]:
    """Every cue of each record: its text, its stored cues (source turn, generated questions)
    and, with ``templates``, the rule-made questions of ``memory.questions`` (computed, not
    stored: they cost nothing and follow the rules of the installed version)."""
    made = template_cues(records) if templates else {}
    out = {}
    for rec in records:
        stored = [c for c in map(Cue.decode, rec.cues) if c.kind != "text"]
        seen = {c.text.lower() for c in stored}
        extra = [Cue("template", q) for q in made.get(rec.id, ()) if q.lower() not in seen]
        out[rec.id] = [Cue("text", rec.text)] + stored + extra
    return out


def ensure_cues(db: MemoryVectorDB, records: Sequence[MemoryRecord], model, tokenizer, store: ChatStore,
                n_questions: int = 3, seed: int = 0, secret_filter=None) -> None:
    """Generates and stores the source turn and ``n_questions`` model questions for records
    that have no stored cues yet (``memory_cues`` reads every cue afterwards). With a
    ``secret_filter``, a source message or question holding a secret is not kept as a cue (the
    memory itself passed the filter, its source turn may not)."""
    todo = [r for r in records if not r.cues]
    if todo:
        logger.info("generating cues for %d memories", len(todo))
        questions = generate_questions(model, tokenizer, [r.text for r in todo], n=n_questions, seed=seed) \
            if n_questions > 0 else [[] for _ in todo]
        sessions: Dict[str, object] = {}
        counts: collections.Counter = collections.Counter()
        keep = (lambda t: secret_filter.keep(t, counts)) if secret_filter is not None else (lambda t: True)
        for rec, qs in zip(todo, questions):
            cues = [Cue("question", q) for q in qs if keep(q)]
            src = source_text(store, rec, sessions)
            if src and src.lower() != rec.text.lower() and keep(src):
                cues.insert(0, Cue("source", src))
            db.set_cues(rec.id, [c.encode() for c in cues] or [Cue("text", rec.text).encode()])
        log_filtered(counts, "cues")
