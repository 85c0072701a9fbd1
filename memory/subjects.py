"""Subject keys: which facts describe the same single-valued attribute.

The update rule ("a newer fact on the same subject supersedes the older one") needs
to know that "The user lives in Lisbon" and "The user moved to Porto" are about the
same thing, while "The user likes jazz" and "The user likes hiking" are not. A 135M
model cannot make that call reliably, so it is a small table of functional relations
(an attribute with one current value), plus whose attribute it is: "The user's
sister lives in Madrid" is ``sister:residence`` and never supersedes ``user:residence``.

Facts that match no relation get no key and are never superseded automatically:
a missed update leaves two facts (visible, fixable with the memory CLI); a wrong
update would hide a true one.
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

RELATIONS: Tuple[Tuple[str, str], ...] = (
    ("residence", r"\b(?:lives?|living|moved|relocated|based)\s+(?:in|to)\b"),
    ("employer", r"\bworks?\s+(?:at|for)\b"),
    ("job", r"\b(?:works?\s+as|job\s+is)\b"),
    ("age", r"\b(?:\d+\s*(?:-\s*)?years?(?:\s*-\s*|\s+)old|turned\s+\d+|age\s+is)\b"),
    ("name", r"\b(?:name\s+is|is\s+(?:called|named))\b"),
    ("favorite_{0}", r"\bfavou?rite\s+(\w+)"),
    ("diet", r"\b(?:vegetarian|vegan|pescatarian|eats?\s+meat|eating\s+(?:meat|fish))\b"),
    ("current_book", r"\b(?:is\s+|currently\s+|'s\s+)?reading\b"),
    ("commute", r"\b(?:commutes?|cycles?\s+to\s+work|takes?\s+the\s+(?:metro|bus|train)\s+to\s+work|drives?\s+to\s+work)\b"),
    ("work_schedule", r"\b(?:shifts?|office\s+hours)\b"),
    ("flat_floor", r"\bflat\s+is\s+on\s+the\b"),
    # who the owner lives with (not a pet: "lives with their dog Max" states no household change)
    ("household", r"\b(?:(?:lives?|living)\s+with|moved\s+in\s+with|shares?\s+(?:a|the|their|his|her)\s+"
                  r"(?:flat|apartment|house|home|place)\s+with)\b(?!\s+(?:(?:their|his|her|a|an|the|two|three)\s+)?"
                  r"(?:\w+\s+)?(?:dogs?|cats?|pets?|pupp(?:y|ies)|kittens?)\b)"),
    # whether the owner has a car, and which ("drives to work" is the commute, matched above)
    ("car", r"\b(?:drives?\s+(?:a|an|the|their|his|her)\b|(?:owns?|has|have|had|sold|bought|got)\s+"
            r"(?:a|an|the|their|his|her|a\s+new)?\s*(?:[\w-]+\s+){0,2}car\b|car\s+anymore)"),
)
_COMPILED = tuple((name, re.compile(pattern, re.I)) for name, pattern in RELATIONS)
_OWNER = re.compile(r"^the\s+user(?:'s|\u2019s)?\s*", re.I)
_RELATIVES = re.compile(
    r"\b(sister|brother|mother|mom|mum|father|dad|parents?|wife|husband|partner|boyfriend|girlfriend|"
    r"son|daughter|kids?|children|friend|dog|cat|pet|boss|colleague|neighbou?r|flatmate|housemate)\b",
    re.I,
)


def _owner(text: str, relation_start: int) -> str:
    """Whose attribute: 'user', or the relative/pet named before the relation."""
    m = _OWNER.match(text)
    if not m or not re.match(r"^the\s+user(?:'s|\u2019s)", text, re.I):
        return "user"
    between = text[m.end():relation_start]
    rel = _RELATIVES.search(between)
    return rel.group(1).lower().rstrip("s") if rel else "user"


def subject_key(fact: str) -> Optional[str]:
    """``owner:relation`` for facts about a single-valued attribute, else None."""
    text = fact.strip()
    for name, pattern in _COMPILED:
        m = pattern.search(text)
        if m:
            relation = name.format(*(g.lower() for g in m.groups())) if m.groups() else name
            return f"{_owner(text, m.start())}:{relation}"
    return None
