"""The update rule: does a newer fact replace an older one of the same user?

"The user lives in Lisbon" is replaced by "The user moved to Porto"; "The user likes jazz" is
not replaced by "The user likes hiking". There is no table of the attributes a user may have:
each fact is parsed into an **owner** (the user, or the user's sister, dog, bakery...), a
**relation** (its main verb with its preposition) and the words of its **value**, and the pair
is compared with general rules of English about change:

1. **same functional relation, new value**: relations that hold one value at a time (where
   someone lives, works, works as, their age, name, a favourite X): "lives in Lisbon" /
   "moved to Porto";
2. **a correction**: "..., not Tuesday" or "(not Tuesday)" where the older fact says Tuesday
   ("not the 12th" corrects "on 12 June"); the one rule that also holds between two facts of one
   message ("it's 520, no wait, 540 since March");
3. **a change verb on the same thing**: the newer fact says the thing stopped or changed
   (stopped, quit, sold, died, moved, broke up, no longer...) and shares a content word with the
   older one ("owns a Corolla" / "sold his Corolla"); a weaker marker (now, new, instead,
   switched) needs two shared words, or the same verb with a new quantity ("runs three times a
   week" / "now runs four times a week");
   an ending verb (quit, sold, stopped, gave up...) whose object the older fact names in the
   same form ("sings in a gospel choir" / "quit the choir"); and a thing that ended (died, broke
   up...) when it is a shared name or the owner itself ("hamster Biscuit sleeps all day" /
   "hamster Biscuit died");
4. **a plan and its outcome**: "plans to take the exam" or "is sitting the exam in April" (a
   progressive with a time to come) / "passed the exam": the newer fact reports something done
   (its first verb in the past) and shares two words or a name with the plan, or is the plan's
   verb done ("intends to enrol" / "has enrolled"); an attempt under
   way ("is applying to TU Dresden") ends the same way when a name is shared;
5. **negation flipped**: "doesn't sell bread yet" / "now sells bread" (two shared words or a
   shared name);
6. **a new value of the same thing**: "the user's rent is 2400 zloty a month" / "the user's rent
   is 2600": the same owned thing, the same kind of statement (see 9), a new number first;
7. **taken up again**: "left the running club" / "rejoined the club in the Meadows"; "gave up
   caffeine" / "drinks one coffee a day again" (what the ending was done to, again);
8. **what it replaced, named**: "cycles to work instead of taking the metro" / "takes the metro":
   the head noun of what "instead of" or "rather than" sets aside is a word of the older fact (an
   activity alone, "instead of working", names no one fact), and the activity it names is the
   older fact's ("a tram driver" is not what "instead of taking the tram" sets aside);
9. **a new one of the same thing**: "the user's new flat is on the ground floor" / "the user's flat
   is on the third floor": the newer fact's owner is a new X, the older one's the X, and both say
   the same kind of thing of it (the same words up to the first content word: "is on the").
   A new activity alone replaces nothing: "is learning German now" leaves "is learning the violin";
10. **a new frequency**: the same verb, continued the same way, a new count of the same period
   ("goes to the gym 3x a week" / "goes to the gym about once a week").

Owners must agree: "The user's sister lives in Madrid" never replaces where the user lives. A
fact about someone the other fact names agrees through the name ("The user's boyfriend Jay is a
chef" / "The user and Jay broke up"), but a change of that someone's ("Kasia stopped eating meat")
is no change of the user's fact that names them. "The user and X ..." is the user's own fact.
A missed update leaves two facts (visible, fixable with the memory CLI); a wrong one would hide
a true fact, so every rule asks for evidence from both texts.
"""
from __future__ import annotations

import dataclasses
import re
from typing import FrozenSet, Optional

from memory.grounding import STOP_WORDS, content_words, stem, words
from memory.rewrite import IRREGULAR_PAST

_OWNER = re.compile(r"^\s*the\s+user(?:'s|\u2019s)\s+", re.I)
_USER = re.compile(r"^\s*the\s+user\b", re.I)
_ADJECTIVES = frozenset("older younger little big new old best eldest oldest youngest late baby twin step".split())
_ADVERBS = frozenset("now still also just currently recently finally already no longer never usually often "
                     "always sometimes only really even has have had is are was were does did not "
                     "doesn't don't didn't isn't aren't wasn't hasn't haven't".split())
# relations that hold one value at a time, with the phrasings that state them
_FUNCTIONAL = (
    ("live_in", re.compile(r"\b(?:lives?|living|lived|moved|moving|relocated|relocating|based)\s+(?:(?:alone|\w+ly)\s+)?"
                           r"(?:in|to)\b(?!\s+together)"
                           r"|\bmoved\s+(?:out\s+of|into)\b", re.I)),
    # who one lives with (a pet is no housemate: "lives with their dog" changes no household)
    ("live_with", re.compile(r"\b(?:(?:lives?|living)\s+with|moved\s+in\s+with|shares?\s+(?:a|the|their|his|her)\s+"
                             r"(?:flat|apartment|house|home|place)\s+with)\b(?!\s+(?:(?:their|his|her|a|an|the|two|three)\s+)?"
                             r"(?:\w+\s+)?(?:dogs?|cats?|pets?|pupp(?:y|ies)|kittens?)\b)", re.I)),
    ("work_as", re.compile(r"\b(?:works?|working)\s+as\b|\bjob\s+is\b", re.I)),
    ("work_at", re.compile(r"\b(?:works?|working)\s+(?:at|for)\b", re.I)),
    # the owner's own age, said first ("is 34 years old", "turned 35"), not a pet's in passing
    ("age", re.compile(r"^\s*(?:(?:is|was|has|just|now|recently)\s+)*(?:\d+\s*(?:-\s*)?years?(?:\s*-\s*|\s+)old\b|aged\s+\d+\b"
                       r"|turned\s+\d+\b)|^\s*is\s+(?:now\s+)?\d{1,3}\s*$|\bage\s+is\b", re.I)),
    ("name", re.compile(r"\bname\s+is\b|\bis\s+(?:called|named)\b", re.I)),
    ("favourite_{0}", re.compile(r"\bfavou?rite\s+(\w+)\b", re.I)),
)
_STRONG_CHANGE = re.compile(
    r"\b(?:stopped|stops|quit|quits|gave\s+up|given\s+up|no\s+longer|no\s+more(?!\s+than)|not\s+any\s*more|any\s*more|sold|"
    r"sells?\s+(?:his|her|their)|died|passed\s+away|broke\s+up|split\s+up|divorced|moved|(?:left|leaves)(?!\s+for\b)|dropped|"
    r"cancell?ed|ended|lost|"
    r"retired|finished|got\s+rid)\b", re.I)
_WEAK_CHANGE = re.compile(r"\b(?:now|new|instead|switched|changed|these\s+days|started|starts)\b", re.I)
_PLAN = re.compile(r"\b(?:(?:plans?|planning|planned)(?=\s+(?:to|on|an?|the|for|their|his|her|its|our|my|some)\b)|"
                   r"going\s+to|will|wants?\s+to|hopes?\s+to|intends?\s+to|"
                   r"considering|thinking\s+(?:about|of)|might)\b", re.I)
# the verb a plan is about: "intends to enrol in ...", "wants to buy a flat" -> enrol, buy
_PLAN_VERB = re.compile(r"\b(?:plans?|planning|going|wants?|hopes?|intends?)\s+to\s+(\w+)|\bwill\s+(\w+)", re.I)
# a thing taken up again: "rejoined the club" after "left the club"
_RESUMED = re.compile(r"\b(?:rejoined|restarted|resumed|returned\s+to|went\s+back\s+to|is\s+back\s+(?:at|to|in)|"
                      r"started\s+\w+ing\s+again)\b", re.I)
# "is sitting the exam in April", "starting a course next month": a progressive with a time to come
_PROGRESSIVE = re.compile(r"\b(?!(?:morn|even|noth|someth|anyth|everyth|dur|th|k|r|spr|w|build|s)ing\b)\w{2,}ing\b", re.I)
_FUTURE = re.compile(r"\b(?:next|tomorrow|soon|upcoming)\b|\bin\s+(?:a\s+few|\d+|two|three|four|a|an)\s+(?:days?|weeks?|months?)\b"
                     r"|\bin\s+(?:january|february|march|april|may|june|july|august|september|october|november|december)\b",
                     re.I)
# change verbs that end what they are done to ("quit the band", "sold the corolla"); "moved the
# bakery" moves it, and the bakery's other facts stay
_ENDING = re.compile(r"(?:stopped|stops|quit|quits|gave\s+up|given\s+up|sold|dropped|cancell?ed|ended|got\s+rid)", re.I)
_ENDING_WORD = re.compile(rf"\b{_ENDING.pattern}\b", re.I)  # the same, as a word in a fact
# changes that end the thing itself: said of a named thing or of the owner, nothing else is needed
_TERMINAL = re.compile(r"\b(?:died|passed\s+away|broke\s+up|split\s+up|divorced|closed\s+down)\b", re.I)
_INSTEAD = re.compile(r"\b(?:instead\s+of|rather\s+than)\s+(?:(\w+ing)\s+(?=(?:the|a|an|his|her|their|my|its|our)\b))?", re.I)
# how often: "three times a week", "four days a week", "once a month"
_FREQUENCY = re.compile(r"\b(\d+(?=\s*x\b)|\d+|one|two|three|four|five|six|seven|eight|nine|ten|once|twice)\s*"
                        r"(?:(?:x|times?|days?|nights?|hours?|evenings?|mornings?|sessions?)\s+)?"
                        r"(?:a|an|per|each|every)\s+(day|week|fortnight|month|year)\b", re.I)
_JOINT = re.compile(r"^\s*and\s+((?:his|her|their)\s+\w+(?:,?\s+[A-Z][\w-]*)?|[A-Z][\w-]*),?\s+")
_NEW_OWNER = re.compile(r"^\s*the\s+user(?:'s|\u2019s)\s+(?:brand\s+)?new\s+", re.I)
_NEGATION = re.compile(r"\b(?:not|never|no)\b|n[\u2019']t\b", re.I)
_CORRECTION = re.compile(r"[,(]\s*not\s+(?:the\s+|on\s+|in\s+|at\s+)?([^,.;)]+)", re.I)
_QUANTITY = re.compile(r"\b(?:\d+|one|two|three|four|five|six|seven|eight|nine|ten|once|twice|half)\b", re.I)
# words that say when or how much, not what: shared alone they make no subject
_GENERIC = frozenset(stem(w) for w in (
    "day days week weeks month months year years time times morning mornings evening evenings night nights "
    "weekend weekends today tomorrow yesterday ago since until every each daily weekly monthly "
    "monday tuesday wednesday thursday friday saturday sunday mondays tuesdays wednesdays thursdays fridays "
    "saturdays sundays january february march april may june july august september october november december "
    "first second last next early late like likes go goes went get gets got make makes made take takes took "
    "want wants start started plan plans planning going asked answered yes no yeah ok okay sure "
    "out up off down away back over around together "
    "two three four five six seven eight nine ten once twice half"
).split())


@dataclasses.dataclass(frozen=True)
class FactParse:
    owner: str                 # "user", or the head noun of "the user's <X>" (with a name: "daughter sigrid")
    relation: Optional[str]    # a functional relation (see _FUNCTIONAL) or None
    value: str                 # the text after the owner
    verb: Optional[str]        # the stem of the first word of the value that is not an adverb
    words: FrozenSet[str]      # content-word stems of the value, without generic ones
    owned: FrozenSet[str]      # the same with the owner's words ("cat tussi") added
    names: FrozenSet[str]      # stems of capitalised words inside the value (names)
    negated: bool
    plan: bool


def parse_fact(fact: str) -> FactParse:
    text = fact.strip().rstrip(".!")
    owner, value = "user", text
    m = _OWNER.match(text)
    if m:
        toks = text[m.end():].split()
        i = 0
        while i < len(toks) - 1 and (toks[i].lower() in _ADJECTIVES or toks[i].isdigit()):  # "older", "2009"
            i += 1
        head = toks[i].lower().strip(",") if toks else ""
        if head in ("favourite", "favorite"):
            value = text[m.end():]
        else:
            owner = stem(head)
            i += 1
            if i < len(toks) and toks[i][:1].isupper():  # "the user's daughter Sigrid"
                owner += " " + toks[i].lower().strip(",")
                i += 1
            value = " ".join(toks[i:])
    else:
        mu = _USER.match(text)
        if mu:
            value = text[mu.end():]
    # "The user and his girlfriend plan to ...", "The user and Jay broke up": the user's own fact,
    # with the other person's words kept as words of the fact
    joint = _JOINT.match(value) if owner == "user" else None
    partner = joint.group(1) if joint else ""
    value = value[joint.end():] if joint else value
    relation = None
    for name, pattern in _FUNCTIONAL:
        fm = pattern.search(value)
        if fm:
            relation = name.format(*(g.lower() for g in fm.groups())) if fm.groups() else name
            break
    tokens = words(value)
    # 'Asked how often they train, the user answered "..."': the verb says nothing of the fact
    at = _first_word(tokens)
    verb = _asked_verb(text) if text.lower().startswith("asked ") else (None if at is None else stem(tokens[at]))
    # capitalised words that are not a sentence's or a quotation's first word: names
    names = frozenset(stem(w) for w in re.findall(r"(?<![.!?\"\u201c]\s)(?<![\"\u201c])(?<!^)\b([A-Z][\w-]+)", value)
                      + re.findall(r"\b[A-Z][\w-]+", partner) if stem(w) not in _GENERIC)
    owner_words = set(owner.split())
    content = frozenset(_base(w) for w in content_words(f"{partner} {value}") if w not in _GENERIC and w not in owner_words
                        and not w.isdigit())
    # a code of letters and digits names one thing ("10k", "A2", "B1"): a name
    names = names | frozenset(w for w in content if re.fullmatch(r"\d+[a-z]+|[a-z]+\d+", w))
    owned = content | frozenset(w for w in owner_words if w != "user")
    return FactParse(owner=owner, relation=relation, value=value, verb=verb, words=content, owned=owned, names=names,
                     negated=bool(_NEGATION.search(value)),
                     plan=bool(_PLAN.search(value) or (_progressive_verb(value) and _FUTURE.search(value))))


def _progressive_verb(value: str) -> bool:
    """Whether a fact's verb is a progressive: an -ing word first, or after a form of "be"
    ("is sitting the exam", "starting a course"); "a planning assistant" is a noun."""
    tokens = words(value)
    return any(_PROGRESSIVE.fullmatch(t) and (i == 0 or tokens[i - 1] in ("is", "are", "am", "be", "been", "was", "were")
                                              or tokens[i - 1] in _ADVERBS and i == 1)
               for i, t in enumerate(tokens))


def _first_word(tokens) -> Optional[int]:
    """The position of the first word that is neither an adverb nor a stop word (the verb of
    "is now working at ...", the noun of "is a nurse"), or None."""
    return next((i for i, t in enumerate(tokens) if t not in _ADVERBS and t not in STOP_WORDS), None)


def _asked_verb(text: str) -> Optional[str]:
    """The verb of the question in 'Asked how often are they running, the user answered ...'
    ("run"): the first word of the question that is no question word, auxiliary or pronoun."""
    question = text[len("asked "):].split(",", 1)[0]
    skip = _ADVERBS | STOP_WORDS | {"if", "whether", "often", "long", "far", "kind", "sort"}
    return next((stem(t) for t in words(question) if t not in skip), None)


def subject_key(fact: str) -> Optional[str]:
    """``owner:relation`` for a fact about a functional relation ("user:live_in"), else None."""
    p = parse_fact(fact)
    return f"{p.owner}:{p.relation}" if p.relation else None


def _same_owner(old: FactParse, new: FactParse, old_text: str, new_text: str) -> bool:
    if old.owner == new.owner:
        return True
    # "The user has physio on Tuesdays" / "The user's physio sessions are on Thursdays": the one
    # owned thing named in the user's own fact
    # ... or named in it ("The user's boyfriend Jay is a chef" / "The user and Jay broke up")
    if old.owner == "user" and new.owner != "user":
        return bool(set(new.owner.split()) & {stem(w) for w in words(old_text)})
    if new.owner == "user" and old.owner != "user":
        return bool(set(old.owner.split()) & {stem(w) for w in words(new_text)})
    return False


def supersedes(old_text: str, new_text: str) -> Optional[str]:
    """Why ``new_text`` (said later) replaces ``old_text`` for the same user, or None."""
    old, new = parse_fact(old_text), parse_fact(new_text)
    if not _same_owner(old, new, old_text, new_text):
        return None
    if old.relation and old.relation == new.relation and old.owner == new.owner:
        if (re.search(r"\bmoved\s+out\b", new_text, re.I)
                or not _relation_value(old_text, old.relation) & _relation_value(new_text, new.relation)):
            return f"same relation ({old.relation}), new value"
        return None
    shared = old.words & new.words if old.owner == new.owner else old.owned & new.owned
    named = bool(shared & old.names) or bool(shared & new.names)
    correction = _CORRECTION.search(new_text)
    if correction:
        corrected = {_ordinal(w) for w in (stem(t) for t in words(correction.group(1))) if w not in ("the",)}
        if corrected and corrected <= {_ordinal(stem(t)) for t in words(old.value)}:
            return "a correction"
    if new.plan:
        return None
    instead = _INSTEAD.search(new_text)
    replaced = _object_head(new_text, instead) if instead else None
    if replaced and not replaced.endswith("ing") and stem(replaced) in old.owned and _same_activity(instead, old_text):
        return "what it replaced, named"
    same_kind = old.owner == new.owner != "user" and _frame(old.value) and _frame(old.value) == _frame(new.value)
    if same_kind and _NEW_OWNER.match(new_text) and not _NEW_OWNER.match(old_text):
        return "a new one of the same thing"
    numbers = _leading_number(old.value), _leading_number(new.value)
    if same_kind and all(numbers) and numbers[0] != numbers[1]:
        return "a new value of the same thing"
    resumed = _RESUMED.search(new.value)
    if resumed and _STRONG_CHANGE.search(old.value) and shared and _near(new_text, resumed, shared):
        return "taken up again"
    ended = _ENDING_WORD.search(old.value)
    if ended and re.search(r"\bagain\b", new.value, re.I) and _object_words(old.value, ended) & new.words:
        return "taken up again"
    change = _STRONG_CHANGE.search(new_text)
    # what changed, when one fact is about someone the other names: not that someone ("The user
    # lives with Kasia" / "The user's girlfriend Kasia stopped eating meat")
    changed = shared - set(new.owner.split()) - set(old.owner.split()) if old.owner != new.owner else shared
    if (change and not _STRONG_CHANGE.search(old.value)
            and (len(changed) >= 2 or (bool(changed & (old.names | new.names)) or old.verb in changed and _verb_first(old.value))
                 and _near(new_text, change, changed)
                 or _ENDING.fullmatch(change.group(0)) and _object_head(new_text, change) in words(old_text))):
        return "a change on the same thing"
    terminal = _TERMINAL.search(new.value)
    if terminal and not _TERMINAL.search(old.value) and (
            named or (old.owner == new.owner != "user" and terminal.start() == len(new.value) - len(new.value.lstrip()))):
        return "the thing itself ended"
    if _WEAK_CHANGE.search(new.value) and old.verb and old.verb == new.verb:
        if len(shared - {old.verb}) >= 1:
            return "a change on the same thing"
        if _QUANTITY.search(old.value) and _QUANTITY.search(new.value):
            return "a new quantity"
    frequencies = _FREQUENCY.search(old.value), _FREQUENCY.search(new.value)
    if (all(frequencies) and old.verb and old.verb == new.verb and frequencies[0].group(2) == frequencies[1].group(2)
            and frequencies[0].group(1).lower() != frequencies[1].group(1).lower() and _same_complement(old.value, new.value)):
        return "a new frequency"
    if (old.plan or _ongoing(old.value) and named) and _outcome(new.value, new_text) and (
            len(shared) >= 2 or named or _same_plan_verb(old.value, new.value)):
        return "a plan and its outcome"
    negated = _negated_verb(old_text) if old.negated and not new.negated else None
    if negated and negated in {stem(w) for w in words(new.value)} and len(shared) >= 2:
        return "negation flipped"
    return None


def _verb_first(value: str) -> bool:
    """Whether a fact's first content word is its verb: only adverbs and auxiliaries come before
    it ("still owns a Corolla"), no article ("had an amazing wedding": "amazing" is no verb)."""
    tokens = words(value)
    at = _first_word(tokens)
    return at is not None and all(t in _ADVERBS or t in ("be", "been", "am") for t in tokens[:at])


def _same_activity(instead, old_text: str) -> bool:
    """Whether the activity "instead of taking the metro" sets aside is the older fact's (it says
    "takes"), when one is named: "a tram driver" is no "instead of taking the tram"."""
    if not instead.group(1):
        return True
    verb = stem(instead.group(1))
    return any(w.startswith(verb) or stem(w) == verb for w in words(old_text))


def _object_words(value: str, match) -> FrozenSet[str]:
    """The content words of the three words after an ending ("stopped eating meat" -> eat, meat)."""
    return frozenset(_base(w) for w in words(value[match.end():])[:3] if w not in STOP_WORDS and stem(w) not in _GENERIC)


def _same_complement(old_value: str, new_value: str) -> bool:
    """Whether two facts continue their verb the same way: the same next word ("goes to the gym")
    or a number in both ("works four days" / "works three days"), not "works out three days"."""
    def after_verb(value):
        tokens = [t for t in words(value) if t not in _ADVERBS and t not in ("about", "around", "roughly")]
        at = _first_word(tokens)
        nxt = tokens[at + 1] if at is not None and at + 1 < len(tokens) else ""
        return "#" if _QUANTITY.fullmatch(nxt) else nxt
    return after_verb(old_value) == after_verb(new_value) != ""


def _ordinal(word: str) -> str:
    """A day or rank without its suffix ("12th" -> "12"): "not the 12th" corrects "on 12 June"."""
    return re.sub(r"^(\d+)(?:st|nd|rd|th)$", r"\1", word)


def _frame(value: str) -> tuple:
    """The words of a fact's value before its first content word ("is on the third floor" -> is,
    on, the): what kind of thing it says of its owner."""
    tokens = words(value)
    at = _first_word(tokens)
    return tuple(tokens[:at]) if at else ()


def _base(word: str) -> str:
    """The stem of a word, irregular past forms by their base ("bought" -> buy)."""
    return stem(IRREGULAR_PAST.get(word, word))


def _leading_number(value: str) -> Optional[str]:
    """The number a fact's value gives first, when it is its first content ("is 2600 zloty a
    month" -> 2600): a price, a count, an age."""
    tokens = words(value)
    at = _first_word(tokens)
    return tokens[at] if at is not None and re.fullmatch(r"\d[\d,.]*", tokens[at]) else None


def _same_plan_verb(old_value: str, new_value: str) -> bool:
    """Whether the outcome's verb is the plan's ("intends to enrol in a diploma" / "has
    enrolled"; "wants to buy a flat" / "bought the flat")."""
    m = _PLAN_VERB.search(old_value)
    tokens = words(new_value)
    at = _first_word(tokens)
    if not m or at is None:
        return False
    verb = _base(m.group(1) or m.group(2))
    if verb != _base(tokens[at]) or verb in _GENERIC or verb in STOP_WORDS or verb == "keep":  # "get", "keep": any thing
        return False
    after = tokens[at + 1:at + 2]
    # the verb alone ("has enrolled, and ...") or with a word of the plan's object
    return not after or after[0] in ("and", "but", "so") or bool(
        {_base(t) for t in words(old_value)} & {_base(t) for t in tokens[at + 1:]} - {verb} - STOP_WORDS - _GENERIC)


def _ongoing(value: str) -> bool:
    """Whether a fact's first verb is a progressive after "is" ("is applying to TU Dresden"): an
    attempt under way, which a past outcome naming the same thing ends ("got the admit from TU
    Dresden")."""
    tokens = words(value)
    at = _first_word(tokens)
    return at is not None and at > 0 and tokens[at - 1] in ("is", "are") and bool(_PROGRESSIVE.fullmatch(tokens[at]))


def _outcome(value: str, text: str) -> bool:
    """Whether a fact reports something done: its first verb is in the past ("passed the exam",
    "started the course", "was admitted"), in a short answer the answer's ("... answered "started
    in May""). "is gonna show their paintings" or "is inspired by it" is no plan's outcome."""
    quoted = re.search(r"answered\s+[\"\u201c]([^\"\u201d]*)", text) if text.lower().startswith("asked ") else None
    tokens = words(quoted.group(1) if quoted else value)
    at = _first_word(tokens)
    if at is None or (at and tokens[at - 1] in ("is", "are", "am", "be", "being")):  # "is inspired": a state
        return False
    return tokens[at].endswith("ed") or tokens[at] in IRREGULAR_PAST


def _relation_value(text: str, relation: str):
    """Content-word stems of the first words after the relation ("moved to Porto two weeks ago"
    -> {porto}): equal values restated in other words share one."""
    for name, pattern in _FUNCTIONAL:
        m = pattern.search(text)
        if m and (name == relation or name.startswith("favourite_")):
            if name == "age":
                return set(re.findall(r"\d+", m.group(0)))
            tail = text[m.end():]
            return {w for w in (stem(t) for t in words(tail)[:4]) if w not in _GENERIC and w not in STOP_WORDS} \
                or {stem(t) for t in words(tail)[:4]}
    return set()


def _near(text: str, match, shared, window: int = 3) -> bool:
    """Whether a shared word stands within ``window`` words of the change ("sold his Corolla",
    "Jordi broke up"): the change is about that thing, not about something else in the sentence."""
    before = [stem(w) for w in words(text[:match.start()])][-window:]
    after = [stem(w) for w in words(text[match.end():])][:window]
    return bool(set(before + after) & shared)


def _object_head(text: str, match) -> Optional[str]:
    """The head noun of what the change is done to, as written: the last word of the noun phrase
    right after it ("quit the band" -> band, "sold the old corolla last week" -> corolla, "quit
    the college chess club" -> club), or None. The older fact must name it in the same form ("sold
    their car" is not about "small cars")."""
    clause = re.split(r"[,.;:!?]", text[match.end():], maxsplit=1)[0]
    head = None
    for w in words(clause):
        if w in ("the", "a", "an", "his", "her", "their", "my", "its", "this", "that", "our"):
            if head is None:
                continue
            break
        if w in STOP_WORDS or stem(w) in _GENERIC or w.isdigit():
            break
        head = w
    return head


def _negated_verb(text: str) -> Optional[str]:
    """The stem of the word a negation applies to ("doesn't sell bread" -> "sell")."""
    m = re.search(r"(?:\b(?:not|never)|n[\u2019']t)\s+(?:\w+ly\s+)?(\w+)", text, re.I)
    return stem(m.group(1)) if m else None
