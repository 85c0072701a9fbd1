"""Extraction by rewriting: the user's own first-person sentence, shifted to the third person.

``--extraction_method rewrite``. A 135M model asked to restate "I work for a health software
company called Medilink" wrote "The user works as a health software company": the name was
lost and the fact turned false. Constrained decoding keeps it from inventing words, not from
dropping or misattaching them ("Marta works as an architect" became "The user is an
architect"). Most of what users say about themselves is already a fact in the first person;
the faithful memory is that sentence with the person changed:

- "I work as a nurse and I usually work night shifts" -> "The user works as a nurse." and
  "The user usually works night shifts.";
- "My favourite food is mushroom risotto, but it takes ages" -> "The user's favourite food is
  mushroom risotto." (a trailing ", but/so/because ..." clause is a comment, not the fact);
- "Big news: I'm not a nurse anymore!" -> "The user is not a nurse anymore.";
- "Hi, I'm Sam." -> "The user's name is Sam.";
- "Max is a beagle." after "I have a dog called Max" -> "The user's dog Max is a beagle." (a
  person or pet the user introduced keeps its relation to the user);
- "They're my favourite band now." after "... was by Big Thief." -> "Big Thief are the user's
  favourite band now." (a leading pronoun takes the previous sentence's last proper name).

Every word of a rewritten fact is one of the user's words or a fixed substitute ("the user",
"their", "is", a verb's third-person form), so nothing is invented. Questions, hypotheticals,
plans ("I'll ...") and requests for the moment ("I need dinner ideas for tonight") are not
facts and are skipped. The same filters as model extraction run afterwards (length, polarity,
grounding), so both methods store the same kind of memory.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

# discourse openers that carry no fact ("Hi,", "Also,", "By the way,")
_OPENER = re.compile(
    r"^(?:(?:hi|hey|hello|oh|ok|okay|well|yes|yeah|yep|no|nope|so|and|but|also|plus|anyway|haha|ha|"
    r"by the way|btw|on a different note|actually|honestly|oh and|thanks|thank you|sure|right|true)"
    r"[,!:.]?\s+)+", re.I)
# a label before a colon ("Big news: I ...", "One thing: I ...") when the label has no first person
_LABEL = re.compile(r"^([^:]{1,30}):\s+")
_FIRST = re.compile(r"\b(i|i'm|i've|i'd|i'll|me|my|mine|myself|we|we're|we've|us|our|ours)\b", re.I)
# a trailing comment clause: ", so ...", ", but ...", ", because ...", ", which ..."
_TAIL = re.compile(r"(?:\s*(?:,|;|\s-\s|\s\u2013\s)\s*(?:so|but|because|although|though|which|and so|as|since|"
                   r"honestly|haha)\b|\s+and\s+(?:it|that|this)\b).*$", re.I)
_AND_I = re.compile(r",?\s+and\s+(?=(?:i|i'm|i've|my)\b)", re.I)
_TRANSIENT = re.compile(r"\b(?:tonight|today|this (?:morning|afternoon|evening)|right now)\b", re.I)
_EPISTEMIC = re.compile(r"^(?:i|we)\s+(?:think|guess|suppose|hope|wonder|mean|bet|feel like)\b", re.I)
_ADDRESS = re.compile(r"\b(?:you|your|yours|yourself)\b", re.I)  # about the person addressed, not a fact
_PLAN = re.compile(r"^(?:i'll|i will|we'll|we will|i'm going to|let me)\b", re.I)
_HYPOTHETICAL = re.compile(r"^\s*(if|maybe|perhaps|imagine|suppose)\b|\b(i'd|i would|would i|wish|we'd)\b", re.I)
_ADVERBS = frozenset("usually also still really never often just now originally already always sometimes "
                     "currently recently mostly even only actually finally probably definitely rarely "
                     "barely hardly seldom generally normally regularly".split())
_MODALS = frozenset("can can't cannot could couldn't will won't would wouldn't should shouldn't must might may "
                    "shall did didn't was wasn't had hadn't".split())
# irregular past forms and their base forms
IRREGULAR_PAST = {"got": "get", "sold": "sell", "went": "go", "made": "make", "took": "take", "said": "say",
                  "bought": "buy", "grew": "grow", "met": "meet", "lost": "lose", "found": "find", "left": "leave",
                  "became": "become", "began": "begin", "came": "come", "saw": "see", "ran": "run", "drove": "drive",
                  "flew": "fly", "wrote": "write", "read": "read", "heard": "hear", "felt": "feel", "kept": "keep",
                  "thought": "think", "taught": "teach", "brought": "bring", "caught": "catch", "spent": "spend",
                  "sent": "send", "built": "build", "won": "win", "paid": "pay", "told": "tell", "held": "hold",
                  "stood": "stand", "sat": "sit", "ate": "eat", "drank": "drink", "gave": "give", "knew": "know",
                  "swam": "swim", "sang": "sing", "slept": "sleep", "woke": "wake", "fell": "fall", "broke": "break",
                  "chose": "choose", "forgot": "forget", "rode": "ride", "spoke": "speak", "stole": "steal",
                  "threw": "throw", "wore": "wear", "understood": "understand"}
_IRREGULAR_PAST = frozenset(IRREGULAR_PAST)
_THIRD = {"am": "is", "have": "has", "do": "does", "don't": "doesn't", "haven't": "hasn't", "go": "goes",
          "'m": "is", "are": "are", "be": "be"}
_CONTRACTIONS = {"i'm": ("the user", "is"), "i've": ("the user", "has"), "i'd": ("the user", "would"),
                 "i'll": ("the user", "will"), "we're": ("they", "are"), "we've": ("they", "have")}
# the first first-person word becomes "the user"; later ones pronouns
# "we" is the user and others ("We all have our paths"): never the user alone; "our flat" is the user's
_SUBJECT_FORM = {"i": "the user", "me": "the user", "my": "the user's", "mine": "the user's",
                 "myself": "the user", "we": "they", "us": "them", "our": "the user's", "ours": "the user's"}
_PRONOUN_FORM = {"i": "they", "me": "them", "my": "their", "mine": "theirs", "myself": "themselves",
                 "we": "they", "us": "them", "our": "their", "ours": "theirs"}
_NAME = re.compile(r"\b([A-Z][a-z]+(?:\s+(?:[A-Z][a-z]+|of|the|de|da|van|von)){0,3}(?<!\bof)(?<!\bthe))")
# "my sister Marta", "my beagle Max", "a dog called Max", "a cat named Pixel"
_INTRO = (re.compile(r"\b[Mm]y\s+(?:[a-z]+\s+)?([a-z]+)\s+([A-Z][a-z]+)\b"),
          re.compile(r"\b[Aa]n?\s+(?:[a-z]+\s+)?([a-z]+)\s+(?:called|named)\s+([A-Z][a-z]+)\b"))
_PRONOUN_START = re.compile(r"^(they're|they are|they|it's|it is|he's|he is|she's|she is|he|she)\b\s*", re.I)
_PRONOUN_VERB = {"they're": "are", "they are": "are", "it's": "is", "it is": "is", "he's": "is", "he is": "is",
                 "she's": "is", "she is": "is"}
_NOT_NAMES = frozenset("I The A An My Our This That These Those It He She They We You Hi Hey Also And But So "
                       "Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May "
                       "June July August September October November December".split())


def third_person(verb: str) -> str:
    """'work' -> 'works', 'go' -> 'goes', 'study' -> 'studies'; past forms and modals unchanged."""
    low = verb.lower()
    if low in _THIRD:
        return _THIRD[low]
    if low in _MODALS or low in _IRREGULAR_PAST or low.endswith("ed") or low.endswith("n't"):
        return verb
    if low.endswith(("s", "sh", "ch", "x", "o", "z")):
        return verb + "es"
    if low.endswith("y") and len(low) > 2 and low[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def introductions(texts: Sequence[str]) -> Dict[str, str]:
    """Names the user introduced with their relation: {"Marta": "sister", "Max": "dog"}."""
    found: Dict[str, str] = {}
    for text in texts:
        for pattern in _INTRO:
            for relation, name in pattern.findall(text):
                if name not in _NOT_NAMES and relation not in ("name", "favourite", "favorite", "own"):
                    found.setdefault(name, relation)
    return found


def _last_name(sentence: str) -> Optional[str]:
    """The last proper name of a sentence, not counting its first word ("... by Big Thief")."""
    names = [m.group(1) for m in _NAME.finditer(sentence) if m.start() > 0]
    names = [n for n in names if n.split()[0] not in _NOT_NAMES]
    return names[-1] if names else None


def _strip_openers(text: str) -> str:
    for _ in range(3):
        before = text
        text = _OPENER.sub("", text).strip()
        m = _LABEL.match(text)
        if m and not _FIRST.search(m.group(1)) and _FIRST.search(text[m.end():]):
            text = text[m.end():].strip()
        if text == before:
            break
    return text


_PERSON = re.compile(r"\b(i'm|i've|i'd|i'll|i|me|my|mine|myself|we're|we've|we|us|our|ours)\b", re.I)
_VERB_AFTER = re.compile(r"((?:\s+(?:%s|\w+ly)\b)*)(\s+)([A-Za-z]+(?:'[a-z]+)?)" % "|".join(sorted(_ADVERBS)))
_LATER = {"i'm": "they're", "i've": "they've", "i'd": "they'd", "i'll": "they'll", "we're": "they're",
          "we've": "they've"}


def _shift(clause: str) -> Optional[str]:
    """First person -> third person in place (spacing and punctuation kept); the verb after the
    subject "I" takes its third-person form. None when the clause has no first person."""
    clause = clause.replace("\u2019", "'")
    out: List[str] = []
    pos = 0
    first = True
    for m in _PERSON.finditer(clause):
        if m.start() < pos:  # inside a verb already rewritten
            continue
        word = m.group(1)
        low = word.lower()
        if low == "i" and word != "I" and not re.match(r"\s", clause[m.end():m.end() + 1] or " "):
            continue  # a stray letter, not the pronoun
        out.append(clause[pos:m.start()])
        pos = m.end()
        if low in _CONTRACTIONS:
            subject, verb = _CONTRACTIONS[low]
            out.append(f"{subject} {verb}" if first else _LATER[low])
        elif first:
            out.append(_SUBJECT_FORM[low])
        else:
            out.append(_PRONOUN_FORM[low])
        if low == "i" and first:  # "I usually work" -> "the user usually works"
            v = _VERB_AFTER.match(clause, pos)
            if v:
                out.append(v.group(1) + v.group(2) + third_person(v.group(3)))
                pos = v.end()
        first = False
    if first:
        return None
    out.append(clause[pos:])
    return "".join(out)


_COPULA_WORDS = frozenset("is are was were am be been has have had".split())
_ADVERBIAL_START = frozenset("these this on in at apart every last next since after before during from nowadays "
                             "lately".split())


def _finish(text: str) -> str:
    """Tidy a fact; a short leading adverbial moves to the end, so the fact opens with its
    subject ("These days the user's favourite food is ramen" -> "The user's favourite food is
    ramen these days"), which is how facts are keyed (memory.subjects)."""
    text = re.sub(r"\s+", " ", text).strip().rstrip(".!,;:- ").strip()
    text = text.replace("the user's's", "the user's")
    at = text.lower().find("the user")
    if at > 0:
        prefix = text[:at].strip().rstrip(",").strip()
        words = prefix.split()
        adverbial = text[:at].rstrip().endswith(",") or (words and words[0].lower() in _ADVERBIAL_START)
        if adverbial and len(words) <= 4 and not {w.lower() for w in words} & _COPULA_WORDS:
            text = f"{text[at:]} {prefix[0].lower() + prefix[1:]}"
    return text[0].upper() + text[1:] + "." if text else text


def rewrite_sentence(sentence: str, previous: str = "", known: Optional[Dict[str, str]] = None) -> List[str]:
    """Facts stated by one user sentence, in the third person ([] when it states none).

    ``previous``: the sentence before it in the same message (a leading pronoun refers to its
    last proper name); ``known``: names the user introduced, with their relation."""
    known = known or {}
    s = _strip_openers(sentence.strip())
    if not s or s.endswith("?") or _HYPOTHETICAL.search(s):
        return []
    m = _PRONOUN_START.match(s)
    if m and _FIRST.search(s):
        name = _last_name(previous)
        if not name:
            return []
        verb = _PRONOUN_VERB.get(m.group(1).lower())
        s = f"{name} {verb} {s[m.end():]}" if verb else f"{name} {s[m.end():]}"
    s = _TAIL.sub("", s).strip()
    lead = s.split()[0].strip(",.!") if s.split() else ""
    if not _FIRST.search(s) and lead in known:  # "Max is a beagle." about an introduced name
        rest = s[len(lead):].strip()
        return [] if _TRANSIENT.search(s) else [_finish(f"The user's {known[lead]} {lead} {rest}")]
    facts = []
    for part in _AND_I.split(s):
        part = part.strip().strip(",")
        if not part or _EPISTEMIC.match(part) or _PLAN.match(part) or _TRANSIENT.search(part):
            continue
        name = re.fullmatch(r"(?:i'm|i am)\s+([A-Z][a-z]+)[.!]?", part, re.I)
        if name and name.group(1)[0].isupper() and name.group(1) not in _NOT_NAMES:
            facts.append(f"The user's name is {name.group(1)}.")
            continue
        shifted = _shift(part)
        if shifted and "the user" in shifted.lower() and not _ADDRESS.search(shifted):
            facts.append(_finish(shifted))
    return facts


def rewrite_message(sentences: Sequence[str], known: Optional[Dict[str, str]] = None) -> List[Tuple[str, str]]:
    """(sentence, fact) pairs for one message's ``sentences``, in order."""
    out: List[Tuple[str, str]] = []
    previous = ""
    for sentence in sentences:
        for fact in rewrite_sentence(sentence, previous, known):
            out.append((sentence, fact))
        previous = sentence
    return out
