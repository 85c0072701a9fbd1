"""Grounding: is a fact supported by the user's own words?

A fact passes when every one of its content words (not a stop word, not "user") is
supported by a word the user wrote: the same word after light stemming, or a shared
stem of at least five letters (``lives``/``live``, ``nursing``/``nurse``). Numbers must
match exactly. The check is deliberately lexical: it cannot be talked round.
"""
from __future__ import annotations

import functools
import re
from typing import Set

STOP_WORDS = frozenset("""
a an the and or but of in on at to for with as by from into about over after before than then
is are was were be been being am has have had do does did will would can could should may might
must shall i me my mine myself we us our ours you your yours he him his she her hers it its they
them their theirs this that these those there here who whom which what when where why how
user users not no nor so too very just also now still yet again ever really quite some any all
each every both either neither such own same other another more most much many few lot lots
s t don doesn didn isn aren wasn weren hasn haven hadn won wouldn named called one
dont doesnt didnt isnt arent wasnt werent hasnt havent hadnt wont wouldnt cant couldnt im ive id ill
longer anymore usually currently recently actually themselves themself
theyre theyve theyll theyd youre youve youll youd
""".split())
# Relation words a fact may use although the user did not: they restate the sentence's
# form ("I'm 29" -> "is 29 years old"; 'Asked how often they train, the user answered "twice a
# week"'), never add an entity.
RELATION_WORDS = frozenset("age year old live work job asked answered".split())

_IRREGULAR_PLURAL = (("children", "child"), ("women", "woman"), ("men", "man"), ("people", "person"), ("feet", "foot"),
                     ("teeth", "tooth"), ("mice", "mouse"))
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_SUFFIXES = ("ies", "es", "ed", "ing", "s", "d", "er", "ly")


def variants(word: str) -> Set[str]:
    """The word and its candidate stems (lives -> live, takes -> take, tries -> try)."""
    word = word.lower()
    if word.endswith("'s"):
        word = word[:-2]
    word = word.replace("'", "")
    out = {word}
    for plural, singular in _IRREGULAR_PLURAL:
        if word in (plural, "grand" + plural, "step" + plural):
            out.add(word[: -len(plural)] + singular)  # grandchildren -> grandchild
    if word.endswith("oes"):
        out.add(word[:-2])  # goes -> go
    for suffix in _SUFFIXES:
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            base = word[: -len(suffix)]
            out.add(base + "y" if suffix == "ies" else base)
            if suffix in ("ing", "ed"):
                out.add(base + "e")
                if len(base) > 2 and base[-1] == base[-2]:
                    out.add(base[:-1])  # running -> run
    return out


def stem(word: str) -> str:
    """A canonical representative of ``variants`` (the shortest)."""
    return min(variants(word), key=lambda v: (len(v), v))


def words(text: str) -> list:
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def content_words(text: str) -> Set[str]:
    """Stems of the words that carry meaning."""
    return {stem(w) for w in words(text) if w not in STOP_WORDS and stem(w) not in STOP_WORDS}


@functools.lru_cache(maxsize=32)
def _evidence(evidence: str):
    """The evidence's words and every variant of them (computed once per evidence text: a
    user's whole history is the evidence of each of their rewritten facts)."""
    support = frozenset(words(evidence))
    return support, frozenset(v for w in support for v in variants(w))


def _supported(word: str, evidence_words, evidence_forms) -> bool:
    forms = variants(word)
    if forms & RELATION_WORDS or any(w.isdigit() for w in forms) and word in evidence_words:
        return True
    return bool(forms & evidence_forms)


def grounding_report(fact: str, evidence: str) -> Set[str]:
    """Content words of ``fact`` that ``evidence`` does not support (empty set = grounded)."""
    support, forms = _evidence(evidence)
    return {w for w in words(fact)
            if w not in STOP_WORDS and stem(w) not in STOP_WORDS and not _supported(w, support, forms)}
