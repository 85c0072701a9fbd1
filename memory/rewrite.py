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

import itertools
import re
from typing import Dict, List, Optional, Sequence, Tuple

from memory.grounding import stem

# discourse openers that carry no fact ("Hi,", "Also,", "By the way,")
_OPENER = re.compile(
    r"^(?:(?:hi|hey|hello|oh|ok|okay|well|yes|yeah|yep|no|nope|so|and|but|also|plus|anyway|haha|ha|"
    r"by the way|btw|on a different note|actually|honestly|oh and|thanks|thank you|sure|right|true|wait|"
    r"(?:my\s+)?apologies|sorry(?=[,!.])|my bad|my mistake|i misspoke)"
    r"[,!:.]?\s+)+", re.I)
# a label before a colon ("Big news: I ...", "One thing: I ...") when the label has no first person
_LABEL = re.compile(r"^([^:]{1,30}):\s+")
_FIRST = re.compile(r"\b(i|i'm|i've|i'd|i'll|im|ive|me|my|mine|myself|we|we're|we've|us|our|ours)\b", re.I)
# a trailing comment clause: ", so ...", ", but ...", ", because ...", ", which ..."
_TAIL = re.compile(r"(?:\s*(?:,|;|\s-\s|\s[\u2013\u2014]\s)\s*(?:so|but|because|although|though|which|and so|as|since|"
                   r"honestly|haha)\b|\s+and\s+(?:it|that|this)\b).*$", re.I)
# a clause joined to the next by "and/so/but/because ..." whose subject is the user again: two facts
# ("I'm lactose intolerant so I use oat milk" -> both)
_AND_I = re.compile(r",?\s+(?:and|so|but|because|since|and so)\s+(?=(?:(?:now|then|also|still)\s+)?"
                    r"(?:i|i'm|i've|my|we|we're)\b)", re.I)
# chat filler that is no part of a fact: laughter, acronyms, emoji; and a trailing tag question
_FILLER = re.compile(r"\s*\b(?:lol|lmao|rofl|haha+|hehe+|omg|ugh+|smh|tbh|btw|fyi|xd|tho)\b[.!]*", re.I)
_EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\uFE0F\u200D]+|(?<!\\S)[:;]-?[)(DPp](?!\\S)")
_TAG = re.compile(r",\s*(?:does|do|did|is|isn't|was|are|right|you know|no)\b[^,]{0,25}$", re.I)
# a comment after "so" without a comma: "My knee is bad so no jogging"
_SO_TAIL = re.compile(r"\s+so\s+(?=(?:no|not|that|it|this|there|the|they|he|she)\b).*$", re.I)
_TRANSIENT = re.compile(r"\b(?:tonight|today|this (?:morning|afternoon|evening)|right now)\b", re.I)
_EPISTEMIC = re.compile(r"^(?:(?:i|we)\s+)?(?:think|guess|suppose|hope|wonder|mean|bet|feel like|felt like)\b"
                        r"|^we\s+all\b", re.I)  # "we all ..." speaks of everyone, not of the user
_ADDRESS = re.compile(r"\b(?:you|your|yours|yourself)\b", re.I)  # about the person addressed, not a fact
_PLAN = re.compile(r"^(?:let me)\b", re.I)
# a plan ("I'll ...", "I'm going to ...") is a fact when it is anchored: a time, a number or a name
# ("I'll sell the scooter before I go", "I'll take the Hurtigruten"); "I'll try my best" is not
_INTENT = re.compile(r"^(?:i'll|i will|we'll|we will|i'm going to|i am going to|we're going to)\b", re.I)
_ANCHOR = re.compile(r"\d|\b(?:next|tomorrow|soon|before|after|until|this\s+(?:week|weekend|month|year|spring|summer|"
                     r"autumn|fall|winter)|(?:in|on|by)\s+(?:%s))\b|(?<!^)(?<![.!?]\s)\b[A-Z][a-z]+" % "|".join(
                         "january february march april may june july august september october november december spring "
                         "summer autumn winter monday tuesday wednesday thursday friday saturday sunday".split()))
# what the user asks for, or how they are right now: no fact to keep ("I need help with a sign",
# "Sorry for my English", "I'm alright", "Help me make a budget")
_REQUEST = re.compile(r"^(?:i|we)\s+(?:really\s+)?(?:need|want|would like|could use)\s+(?:some\s+|a\s+little\s+)?"
                      r"(?:help|advice|ideas?|tips?|suggestions?|a hand|recommendations?)\b"
                      r"|^(?:help|tell|show|give|make|find|send)\s+(?:me|us)\b|^sorry\b"
                      r"|^(?:i|we)\s+(?:have|had|got)\s+(?:(?:a|one|some|a few|few|two|another|quick|small|little)\s+)*"
                      r"questions?\b", re.I)
# how the user feels at the moment ("I'm alright", "I'm a little nervous", "im so tired of this rain"):
# no fact to keep. Fears and allergies ("scared of heights") are not moods
_MOOD = re.compile(r"^(?:i'm|i am|we're|we are|feeling)\s+(?:(?:all|just|pretty|very|quite|so|a|little|bit|really|super|"
                   r"kinda|kind of|rather|feeling|getting|a bit|bit)\s+)*(?:alright|fine|good|ok|okay|great|well|busy|"
                   r"keeping busy|not bad|tired|exhausted|knackered|shattered|nervous|anxious|stressed|worried|excited|"
                   r"sad|upset|happy|glad|bored|frustrated|annoyed|overwhelmed|relieved|thrilled|gutted|sick and tired|"
                   r"fed up|sleepy|hungry)(?:\s+(?:today|now|lately|rn|atm|at the moment|right now|tbh|honestly|"
                   r"(?:of|about|with)\s+(?:this|that|it|everything)\b.*))?\s*[.!]*$"
                   r"|^(?:i'm\s+)?keeping busy[.!]?$", re.I)
_HYPOTHETICAL = re.compile(r"^\s*(if|maybe|perhaps|imagine|suppose)\b|\b(i'd|i would|would i|wish|we'd)\b", re.I)
# a sentence that is all hypothetical ("If I won, I'd buy a boat"); a clause "I would like ..." alone is dropped
_HYPOTHETICAL_SENTENCE = re.compile(r"^\s*(if|maybe|perhaps|imagine|suppose)\b|\b(would i|wish)\b", re.I)
_ADVERBS = frozenset("usually also still really never often just now originally already always sometimes "
                     "currently recently mostly even only actually finally probably definitely rarely "
                     "barely hardly seldom generally normally regularly both".split())
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
                  "threw": "throw", "wore": "wear", "understood": "understand", "did": "do",
                  # the same form in the past: a user telling what happened means the past ("I quit the choir")
                  "quit": "quit", "put": "put", "cut": "cut", "hurt": "hurt", "shut": "shut"}
_IRREGULAR_PAST = frozenset(IRREGULAR_PAST)
_THIRD = {"am": "is", "have": "has", "do": "does", "don't": "doesn't", "haven't": "hasn't", "go": "goes",
          "'m": "is", "are": "are", "be": "be"}
_CONTRACTIONS = {"i'm": ("the user", "is"), "i've": ("the user", "has"), "i'd": ("the user", "would"),
                 "i'll": ("the user", "will"), "we're": ("the user", "is"), "we've": ("the user", "has")}
# the first first-person word becomes "the user"; later ones pronouns. "We" as the subject is the
# user with others ("We moved to Leeds", "we use the metro"): what it says holds for the user
_SUBJECT_FORM = {"i": "the user", "me": "the user", "my": "the user's", "mine": "the user's",
                 "myself": "the user", "we": "the user", "us": "the user", "our": "the user's",
                 "ours": "the user's"}
_PRONOUN_FORM = {"i": "they", "me": "them", "my": "their", "mine": "theirs", "myself": "themselves",
                 "we": "they", "us": "them", "our": "their", "ours": "theirs"}
# a capitalised name, accents included ("Inês", "Zoë")
_W = r"[A-Z][a-zà-öø-ÿ]+"
_NAME = re.compile(r"\b(%s(?:\s+(?:%s|of|the|de|da|van|von)){0,3}(?<!\bof)(?<!\bthe))" % (_W, _W))
# "my sister Marta", "my husband, Duncan,", "my beagle Max", "a dog called Max", "a cat named Pixel"
# people and pets, for the forms with a comma ("my husband, Duncan,"; "my business, Jon, congrats" is no one)
_KIN = ("husband|wife|partner|boyfriend|girlfriend|bf|gf|fiance|fiancee|brother|sister|mother|father|mom|mum|dad|"
        "son|daughter|kid|child|baby|friend|neighbour|neighbor|cousin|aunt|uncle|niece|nephew|grandma|grandpa|"
        "grandmother|grandfather|granddaughter|grandson|boss|colleague|roommate|flatmate|housemate|landlord|"
        "landlady|doctor|physio|therapist|teacher|coach|mentor|dog|cat|puppy|kitten|horse|rabbit|parrot|pet")
_INTRO = (re.compile(r"\b[Mm]y\s+(?:[a-z]+\s+)?([a-z]+)\s+(%s)\b" % _W),
          re.compile(r"\b[Mm]y\s+(?:[a-z]+\s+)?(%s),\s+(?:(?:her|his|their)\s+name\s+is\s+)?(%s)\b" % (_KIN, _W)),
          re.compile(r"\b[Aa]n?\s+(?:[a-z]+\s+)?([a-z]+)\s+(?:called|named)\s+(%s)\b" % _W))
# "We have two children: Rafael is nine and Inês is six": the names that follow a count of them
_COUNTED = re.compile(r"\b(?:have|has|got)\s+(?:two|three|four|five|\d)\s+(kids|children|sons|daughters|boys|girls|dogs|cats|"
                      r"brothers|sisters|grandchildren|grandsons|granddaughters)\b")
_WITH_I = re.compile(r"^((?:[Mm]y|[Oo]ur)\s+[a-z]+(?:\s+%s)?|%s)\s+and\s+I\b(?!')" % (_W, _W))
# a question put after a statement: "Efua's birthday is October 12, what should I get her?"
_ASK_TAIL = re.compile(r",\s+(?:what|how|where|when|which|who|why|any|anything|can|could|should|would|do|does|"
                       r"is|are|will)\b[^,.!]*\?$", re.I)
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


def _introduced(text: str):
    """(position, relation, name) of each person or pet ``text`` introduces ("my sister Marta",
    "two children: Rafael is nine and Inês is six")."""
    for pattern in _INTRO:
        for m in pattern.finditer(text):
            relation, name = m.groups()
            if name not in _NOT_NAMES and relation not in ("name", "favourite", "favorite", "own"):
                yield m.start(), relation, name
    counted = _COUNTED.search(text)
    if counted:
        plural = counted.group(1)
        relation = plural[:-3] if plural.endswith("ren") else plural[:-1]
        rest = re.split(r"(?<=[.!?])\s", text[counted.end():], maxsplit=1)[0]
        for m in re.finditer(r"(?:^|[:,;]\s*|\band\s+)(%s)\b(?=\s+(?:is|was|has|turns?|and)\b|[,.])" % _W, rest.strip()):
            if m.group(1) not in _NOT_NAMES:
                yield counted.start(), relation, m.group(1)


def _owner(word: str) -> str:
    """A sentence's first word as a possible name: "Efua's" -> "Efua", "Bastian," -> "Bastian"."""
    word = word.strip(",.!")
    return word[:-2] if word.endswith("'s") else word


def introductions(texts: Sequence[str]) -> Dict[str, str]:
    """Names the user introduced with their relation: {"Marta": "sister", "Max": "dog"}."""
    found: Dict[str, str] = {}
    for text in texts:
        for _, relation, name in _introduced(text):
            found.setdefault(name, relation)
    return found


def _last_name(sentence: str) -> Optional[str]:
    """The last proper name of a sentence, not counting its first word ("... by Big Thief")."""
    names = [m.group(1) for m in _NAME.finditer(sentence) if m.start() > 0]
    names = [n for n in names if n.split()[0] not in _NOT_NAMES]
    return names[-1] if names else None


# an interjection before the first person: a letter held ("BROOO", "yaaay") or shouted ("OMG", "WOW")
_INTERJECTION = re.compile(r"^(\S+?)[,!.]*\s+(?=(?:i|i'm|i've|we|we're|my|our)\b)", re.I)


def _strip_openers(text: str) -> str:
    for _ in range(3):
        before = text
        text = _OPENER.sub("", text).strip()
        m = _INTERJECTION.match(text)
        if m and (re.search(r"([a-z])\1\1", m.group(1), re.I) or m.group(1).isupper() and len(m.group(1)) >= 3):
            text = text[m.end():]
        m = _LABEL.match(text)
        if m and not _FIRST.search(m.group(1)) and _FIRST.search(_with_subject(text[m.end():])):
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
        if low in ("i", "we") and first:  # "I usually work" -> "the user usually works"
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


_DROPPED_SUBJECT = re.compile(r"^([A-Za-z]+)\b(?=\s+(?:a|an|the|my|our|to|at|in|into|on|from|up|out|off|back|"
                              r"with|for|\w+))", re.I)
# words ending in -ed that describe a state, not an action ("Tired of work", "Excited about it")
_STATE_ED = frozenset("tired excited bored interested worried scared married retired confused surprised pleased "
                      "annoyed stressed exhausted relieved amazed disappointed".split())


# the user as a subject: "Handed in my notice" drops it although it says "my"
_SUBJECT_PRONOUN = re.compile(r"\b(?:i|i'm|i've|i'd|i'll|im|ive|we|we're|we've|we'd|we'll)\b", re.I)


def _with_subject(s: str) -> str:
    """A sentence that drops its subject, as chat often does ("got an internship at Tata!",
    "applying to Aachen now"), with the "I" it leaves out; any other sentence unchanged."""
    if _SUBJECT_PRONOUN.search(s) or _ADDRESS.search(s):
        return s
    m = _DROPPED_SUBJECT.match(s)
    if not m:
        return s
    word = m.group(1).lower()
    if word in _IRREGULAR_PAST or (word.endswith("ed") and len(word) > 4 and word not in _STATE_ED):
        return f"I {s[0].lower()}{s[1:]}"
    if not word.endswith("ing") or len(word) <= 4 or word in ("nothing", "something", "anything", "everything",
                                                                 "morning", "evening", "thing", "king", "spring"):
        return s
    later = {w.lower().strip(",.!") for w in s.split()[1:]}
    clause = {w.lower().strip(",.!") for w in re.split(r"[,;:\u2014]", s)[0].split()[1:]}  # its first clause
    if later & (_MODALS | _COPULA_WORDS) or clause & _IRREGULAR_PAST or any(w.endswith("ed") and len(w) > 4 for w in clause):
        return s  # "Wedding will be next summer", "Being outdoors is great", "Seeing it made my day": the subject
    return f"I'm {s[0].lower()}{s[1:]}"


def rewrite_sentence(sentence: str, previous: str = "", known: Optional[Dict[str, str]] = None,
                     context: str = "") -> List[str]:
    """Facts stated by one user sentence, in the third person ([] when it states none).

    ``previous``: the sentence before it in the same message (a leading pronoun refers to its
    last proper name); ``known``: names the user introduced, with their relation; ``context``:
    the assistant's message before, where a he or she the message has not named may have been
    named ("Will Duncan be travelling with you?" / "Only for ten days. He starts a new job")."""
    known = known or {}
    s = _with_subject(_strip_openers(clean_chat_text(sentence)))
    s = _ASK_TAIL.sub(".", s) if len(_ASK_TAIL.sub("", s).split()) >= 3 else s  # "X is Y, what should I do?"
    if not s or s.endswith("?") or _HYPOTHETICAL_SENTENCE.search(s):
        return []
    if not _FIRST.search(s) and _owner(s.split()[0]) not in known:
        # "Big news in the family, Sigrid moved to Trondheim": the clause that opens with a known name
        s = next((c for c in re.split(r"(?<=\S),\s+", s)[1:] if _owner(c.split()[0]) in known), s)
    m = _PRONOUN_START.match(s)
    if m and _FIRST.search(s):
        name = _last_name(previous)
        if not name:
            return _users_clauses(s, known)
        verb = _PRONOUN_VERB.get(m.group(1).lower())
        s = f"{name} {verb} {s[m.end():]}" if verb else f"{name} {s[m.end():]}"
    elif m:  # "She drives a Kia." after "my girlfriend Efua says ...": the person just introduced
        person = _last_person(previous, m.group(1), known) or _last_person(context, m.group(1), known)
        if not person:
            return _users_clauses(s, known)
        verb = _PRONOUN_VERB.get(m.group(1).lower())
        s = f"{person[1]} {verb} {s[m.end():]}" if verb else f"{person[1]} {s[m.end():]}"
        known = {**known, person[1]: person[0]}
    s = _SO_TAIL.sub("", s).strip()
    together = _WITH_I.match(s)  # "Efua and I are moving in together": the user and Efua
    if together:
        partner = re.sub(r"^(?:my|our)\b", "their", together.group(1), flags=re.I)
        rest = s[together.end():]
        verb = next((w for w in rest.split() if w.lower() not in _ADVERBS and not w.endswith("ly")), "")
        facts = [re.sub(r"^The user\b(?!')", f"The user and {partner}", f, count=1)
                 for f in rewrite_sentence("We" + rest, "", known)]
        # two people: the verb stays plural ("The user and their wife go hiking")
        return [re.sub(r"(?<=\s)" + re.escape(third_person(verb)) + r"\b", verb, f, count=1) if verb else f
                for f in facts]
    lead = s.split()[0].strip(",.!") if s.split() else ""
    owner = _owner(lead)  # "Efua's birthday is October 12"
    if not _FIRST.search(_TAIL.sub("", s)) and owner in known:  # "Max is a beagle." about an introduced name
        rest = _TAIL.sub("", s[len(owner):]).strip()
        if _TRANSIENT.search(s) or not [w for w in re.findall(r"[a-z']+", rest.lower()) if w not in _ADVERBS | {"too"}]:
            return []  # "Kasia also.": what it says of her is in the sentence before
        joined = f"The user's {known[owner]} {owner}{rest}" if rest.startswith("'s") else \
            f"The user's {known[owner]} {owner} {rest}"
        return [_finish(f) for f in _self_contained(joined)]
    facts = []
    for part in _AND_I.split(s):
        part = _TAIL.sub("", part).strip().strip(",")
        if _INTENT.match(part) and not _ANCHOR.search(re.sub(r"^\S+\s+", "", part)):
            continue
        if not part or _EPISTEMIC.match(part) or _PLAN.match(part) or _TRANSIENT.search(part) \
                or _REQUEST.match(part) or _MOOD.match(part) or _HYPOTHETICAL.search(part):
            continue
        name = re.fullmatch(r"(?:i'm|i am)\s+(%s)[.!]?" % _W, part, re.I)
        if name and name.group(1)[0].isupper() and name.group(1) not in _NOT_NAMES:
            facts.append(f"The user's name is {name.group(1)}.")
            continue
        shifted = _shift(part)
        if shifted and "the user" in shifted.lower() and not _ADDRESS.search(shifted):
            # a fact that still points elsewhere ("The user has it since 2016") is not self-contained
            facts += [_finish(f) for f in _self_contained(shifted)]
    return facts


# chat spellings without the apostrophe ("im in leeds", "dont have one"), read as written out
_APOSTROPHE = {"im": "I'm", "ive": "I've", "dont": "don't", "didnt": "didn't", "doesnt": "doesn't", "cant": "can't",
               "isnt": "isn't", "havent": "haven't", "wasnt": "wasn't", "arent": "aren't", "wouldnt": "wouldn't",
               "thats": "that's", "theres": "there's"}
# those of them that negate ("dont"): extraction's polarity guard reads them as negations
UNAPOSTROPHISED_NEGATIONS = tuple(k for k, v in _APOSTROPHE.items() if v.endswith("n't"))
_UNAPOSTROPHISED = re.compile(r"\b(?:%s)\b(?=\s+[a-z0-9])" % "|".join(_APOSTROPHE), re.I)


def _users_clauses(s: str, known: Dict[str, str]) -> List[str]:
    """The facts of the clauses after the first when that one opens with a pronoun nothing
    resolves: "She told me to stop running, so I left the club" -> the second clause's."""
    return [f for part in _AND_I.split(s)[1:] for f in rewrite_sentence(part, "", known)]


def clean_chat_text(text: str) -> str:
    """A user's sentence without chat filler ("lol", "haha", emoji) and a trailing tag question
    (", does that count")."""
    text = _EMOJI.sub(" ", text.replace("\u2019", "'"))
    text = _UNAPOSTROPHISED.sub(lambda m: _APOSTROPHE[m.group(0).lower()], text)
    text = _FILLER.sub("", text).strip()
    text = _TAG.sub("", text).strip()
    return re.sub(r"\s+", " ", text).strip(" ,")


_PERSON_PRONOUNS = {"he", "he's", "he is", "she", "she's", "she is"}
# a word that points at something said elsewhere: a third-person pronoun, a demonstrative standing
# alone ("this" but not "this year"), "there" as a place (not "there is")
_REFERENCE_WORD = re.compile(r"\b(?:he|she|him|her|his|it|its)\b"
                             r"|\b(?:this|these|those|that)\b(?![ \t]+(?!(?:up|down|out|off|back|away|over|again|too|"
                             r"either|anymore|any\s+more|now|then|yet)\b)[a-z])"
                             r"|\bthere\b(?!\s+(?:is|are|was|were|will|has|have)\b|'s\b)"
                             r"|\b(?:says?|said|think|thinks|thought|told\s+\w+)\s+so\b"
                             r"|\b(?:this|that|these|those)\s+(?:sort|kind)s?\s+of\s+things?\b", re.I)


_CLAUSE_PRONOUN = re.compile(r"^(they're|they are|they|he's|he is|he|she's|she is|she)\s+", re.I)
_SUBJECT = re.compile(r"^([Tt]he user(?:'s\s+[a-z-]+(?:\s+%s)?)?)\s" % _W)


def _self_contained(fact: str) -> List[str]:
    """The self-contained facts in ``fact``'s comma-separated clauses. A clause that opens with
    he/she/they takes the first clause's subject ("The user's parents are nervous about it,
    they're in Nagpur" -> "The user's parents are in Nagpur"); a clause that still points
    elsewhere (it, this, there...) is dropped; what is left must be about the user. A fact with
    nothing to resolve comes back whole."""
    if not _REFERENCE_WORD.search(fact):
        return [fact]
    clauses = re.split(r"(?<=\S),\s+", fact)
    subject = _SUBJECT.match(clauses[0])
    out: List[str] = []
    for i, clause in enumerate(clauses):
        m = _CLAUSE_PRONOUN.match(clause)
        if i and m and subject:
            verb = _PRONOUN_VERB.get(m.group(1).lower())
            clause = f"{subject.group(1)} {verb} {clause[m.end():]}" if verb else f"{subject.group(1)} {clause[m.end():]}"
        elif i and out and not _REFERENCE_WORD.search(clause) and not m:
            out[-1] = f"{out[-1]}, {clause}"  # a plain continuation of the kept clause
            continue
        if _REFERENCE_WORD.search(clause) or "the user" not in clause.lower() or len(clause.split()) < 4:
            continue
        out.append(clause)
    return out


def _last_person(previous: str, pronoun: str, known: Optional[Dict[str, str]] = None) -> Optional[Tuple[str, str]]:
    """(relation, name) of the last person ``previous`` introduces ("my sister Marta") or names
    among ``known`` ("Efua's birthday is ..."), when ``pronoun`` (he/she) can refer to one."""
    if pronoun.lower() not in _PERSON_PRONOUNS:
        return None
    found = [(start, (relation, name)) for start, relation, name in _introduced(previous)]
    found += [(m.start(), (known[name], name)) for m in _NAME.finditer(previous) for name in m.group(1).split()
              if known and name in known]  # "Will Duncan be ...": the name within the capitalised run
    return max(found, key=lambda f: f[0])[1] if found else None


# a question that offers or asks about the conversation itself ("Would you like ...?"), not about the user
_OFFER = re.compile(r"^(?:would you like|would you prefer|do you want|want me|shall i|should i|can i|could i|"
                    r"may i|would it help|do you need|is there anything|anything else|how about|what about|"
                    r"what would you like\s+(?:me|us|help)|would you rather|ready)\b", re.I)
_ACK = re.compile(r"^(?:thanks|thank you|ok|okay|cool|great|perfect|awesome|nice|sure|no worries|gracias|cheers)\b",
                  re.I)
_TO_THEM = {"you": "they", "your": "their", "yours": "theirs", "yourself": "themselves", "you're": "they're",
            "you've": "they've", "you'd": "they'd", "you'll": "they'll"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MAX_ANSWER_WORDS = 16
# a word that points at something said before: a question with one and no "you" is not a question
# about the user that its answer could stand with ("Is this for this weekend?")
_POINTER = re.compile(r"\b(?:it|its|this|that|these|those|he|she|him|her|they|them|there)\b", re.I)
# how a whole question opens (not a list after a colon: "...: wool, cotton, a blend?")
_ASKS = re.compile(r"(?:what|which|how|where|when|who|whose|why|is|are|was|were|does|do|did|has|have|can|will|any)\b",
                   re.I)
# a possession named alone, as a short answer: "my scooter", "our neighbour's van"
_OWN_THING = re.compile(r"(?:my|our)\s+[\w'-]+(?:\s+[\w'-]+)?", re.I)


# what may stand before the question itself in its sentence: "Caffeine can raise it — do you drink
# coffee?", "Let's start with what comes in: how much ...?", a quoted line
_QUESTION_LEAD = re.compile(r"^.*(?:[.!?]['\"”]?\s+|\s[—–-]\s|:\s)")
# answer words that say nothing by themselves ("Yes.", "Pretty well.", "Not sure yet.")
_BARE_ANSWER = frozenset("yes no yeah yep yup nope nah sure ok okay maybe probably perhaps definitely absolutely "
                         "not really good great fine well pretty question idea yet thanks alright please".split())


_QUESTION_WORDS = frozenset("what which how where when who whose why is are was were do does did have has can could will "
                            "would should you your yours the a an any of to in on at for with and or like".split())


def asked_question(assistant_text: str) -> Optional[str]:
    """The question the assistant's message closes on when it asks about the user: the last
    sentence that ends in "?" and addresses the user ("How often do you train?") or names what
    it asks about ("How many bedrooms does the flat have?"), without what leads up to it in its
    sentence, unless it is an offer ("Would you like a recipe?"). A question that points back
    ("What kind of shop is it?") or speaks of the assistant ("Anything I should know?") is
    none: its answer would not stand alone."""
    for sentence in reversed(_SENTENCE_END.split(assistant_text.strip())):
        s = _QUESTION_LEAD.sub("", sentence.strip()).strip()
        if s.endswith("?") and not _OFFER.match(s) and (
                _ADDRESS.search(s) or _ASKS.match(s) and not (_POINTER.search(s) or _FIRST.search(s))):
            return s
        if sentence.strip().endswith("?"):
            return None  # the message closes on another kind of question: the answer is not about the user
    return None


def _to_them(question: str) -> str:
    """The question about "you" asked about the user: you -> they (a subject) or them (an
    object: "how long does the ride take you" -> "take them"), your -> their."""
    def swap(m):
        word = m.group(0).lower()
        before = question[:m.start()].rstrip().split()[-1:] or [""]
        if word == "you" and before[0].lower().strip(",") not in _SUBJECT_BEFORE:
            return "them"
        return _TO_THEM[word]

    return re.sub(r"\b(?:you're|you've|you'd|you'll|yourself|yours|your|you)\b", swap, question)


_SUBJECT_BEFORE = frozenset("do does did are were have has had can could will would should shall may might must "
                            "and or when where how why what which who if that".split() + [""])


def _answers(clause: str, question: str) -> bool:
    """Whether a clause before the user's first person answers the question by itself: it
    repeats what was asked about or gives a number ("Not spicy" to "Do you like spicy food?")."""
    asked = {stem(w) for w in re.findall(r"[a-z]+", question.lower())} - _QUESTION_WORDS
    said = {stem(w) for w in re.findall(r"[a-z]+", clause.lower())}
    return bool(said - asked) and (bool(asked & said) or bool(re.search(r"\d", clause)))  # not an echo ("Lately")


def answer_fact(question: str, sentences: Sequence[str]) -> Optional[Tuple[str, str]]:
    """(the answer, the fact) when a user message opens with a short answer to ``question``
    ("Twice a week, mornings." to "How often do you train?"): the leading sentences with no
    first person, no question and no thanks, at most ``MAX_ANSWER_WORDS`` words, cut before a
    clause that points elsewhere. The fact keeps the question, so it holds what was asked:
    'Asked how often they train, the user answered "twice a week, mornings".'"""
    lead: List[str] = []
    for sentence in sentences:
        s = clean_chat_text(sentence).rstrip(".!")
        if not s:
            continue
        first = _FIRST.search(s)
        if first and _OWN_THING.fullmatch(s):  # "my scooter": a possession named, no statement
            first = None
        if first and not lead and not s.endswith("?"):
            # "Not spicy, my stomach doesn't like it": the clauses before the first person answer
            clauses = re.split(r"(?<=\S),\s+", s)
            leading = list(itertools.takewhile(lambda c: not (_FIRST.search(c) or _ADDRESS.search(c)), clauses))
            if leading and _answers(", ".join(leading), question) and not _HYPOTHETICAL.search(leading[0]):
                lead.append(", ".join(leading))
            break
        if s.endswith("?") or first or _ADDRESS.search(s) or _ACK.match(s) or _HYPOTHETICAL.search(s):
            break
        if lead and _REFERENCE_WORD.search(s):  # "Uber for now. its not that bad": the answer ends before
            break
        if lead and len(" ".join(lead + [s]).split()) > MAX_ANSWER_WORDS:  # the answer is done; more follows
            break
        lead.append(s)
    answer = ". ".join(lead)
    kept = []
    for clause in re.split(r"(?<=\S),\s+", answer):
        if _REFERENCE_WORD.search(clause) and kept:
            break
        kept.append(clause)
    answer = ", ".join(kept)
    if not answer or _REFERENCE_WORD.search(answer) or len(answer.split()) > MAX_ANSWER_WORDS:
        return None
    if not [w for w in re.findall(r"[a-z0-9]+", answer.lower()) if w not in _BARE_ANSWER]:
        return None  # "Yes.", "Pretty well.": nothing to remember without the conversation
    asked = _to_them(question.rstrip("?").strip())
    asked = asked[0].lower() + asked[1:]
    return answer, f'Asked {asked}, the user answered "{answer}".'


# a thing the user says they have or got: "I got an allotment after ...", "my new bike" -> allotment, bike
_THING = re.compile(r"\b(?:a|an|my|our)\s+(?:[a-z-]+\s+){0,2}?([a-z-]{3,})(?=\s*(?:[.,!;:]|$|\s+(?:in|at|on|for|with|from|"
                    r"after|since|near|called|named|last|this|that|which|who|and)\b))")
_IT_START = re.compile(r"^(it's|it is|it was|it)\s+", re.I)
_IT_VERB = {"it's": "is", "it is": "is", "it was": "was"}
# a statement of a value about a definite thing ("rent is 9000 each", "the clinic opens at 8")
_VALUE_STATEMENT = re.compile(r"^(?:the\s+)?([a-z][a-z-]*(?:\s+[a-z][a-z-]*){0,3})\s+(?=(?:is|are|was|were|costs?|"
                              r"charges?|opens?|closes?|pays?|starts?|ends?|takes?|lasts?)\b)")


# where a sentence's clauses part: a value statement may stand in any of them ("can you make me a
# budget, salary is going up to 14k a month")
_CLAUSE = re.compile(r"\s*(?:[,;]|\s-\s|\s[\u2013\u2014]\s)\s*|\s+(?:and|so|but)\s+", re.I)
_VALUE_START = re.compile(r"^(?:[Tt]he\s+)?[a-z][a-z-]*(?:\s+[a-z][a-z-]*){0,3}\s+(?:is|are|costs?|charges?|pays?)\b.*\d")


def _clause_values(sentence: str, first_clause: bool) -> List[str]:
    """Value statements in clauses of their own: "the mess charges 3500 a month and the food is
    bad so I eat out" or "can you make me a budget, salary is going up to 14k a month". The first
    clause only when the sentence's facts came from elsewhere (a first-person clause): alone, the
    sentence was read whole."""
    clauses = _CLAUSE.split(sentence)[0 if first_clause else 1:]
    return [f for clause in clauses if _VALUE_START.match(_strip_openers(clean_chat_text(clause)))
            for f in _thing_fact(clause, None)]


def _thing_fact(sentence: str, thing: Optional[str]) -> List[str]:
    """Facts of a sentence that speaks of a thing without the first person: "It's up on
    Fjellsiden." after "I got an allotment" (``thing``), or a value of a definite thing
    ("rent is 9000 each", "The clinic opens at 8 am"): the user's."""
    s = _strip_openers(clean_chat_text(sentence))
    if not s or s.endswith("?") or _FIRST.search(s) or _ADDRESS.search(s) or _TRANSIENT.search(s) \
            or _HYPOTHETICAL.search(s):
        return []
    m = _IT_START.match(s)
    if m and thing:
        verb = _IT_VERB.get(m.group(1).lower())
        text = f"the user's {thing} {verb} {s[m.end():]}" if verb else f"the user's {thing} {s[m.end():]}"
    else:
        v = None if m or not re.search(r"\d", s) else _VALUE_STATEMENT.match(re.sub(r"^The\b", "the", s))
        if not v:
            return []
        text = f"the user's {v.group(1)} {s[v.end():]}"
    return [_finish(f) for f in _self_contained(_TAIL.sub("", text).strip())]


# words that make a clause a statement of its own: a fragment has none of them
_FINITE = frozenset("is are was were am be been being has have had do does did can could will would should shall may "
                    "might must isn't aren't wasn't weren't hasn't haven't don't doesn't didn't can't won't it's "
                    "that's there's he's she's they're".split())
# how a fragment that adds to the sentence before may open: "Only on Saturdays for now.", "Every
# other week.", "Since 2019."
_FRAGMENT_START = frozenset("only mostly usually mainly every each on in at since from near twice once for with about "
                            "around until till before after during".split())


def _fragment(sentence: str) -> Optional[str]:
    """A verbless continuation of the sentence before, as chat writes them: "Only on Saturdays
    for now.", "Canela, a mixed breed, 2 years.", "automotive engineering, starting april 2026".
    It has no finite verb, first person, pronoun or question, at most 10 words, and carries
    something: a number, a name after its first word, or a leading preposition or frequency."""
    s = _strip_openers(clean_chat_text(sentence)).rstrip(".!").strip()
    tokens = s.split()
    if not tokens or len(tokens) > 10 or s.endswith("?") or _FIRST.search(s) or _ADDRESS.search(s) \
            or _REFERENCE_WORD.search(s) or _HYPOTHETICAL.search(s) or _PRONOUN_START.match(s) or _TRANSIENT.search(s):
        return None
    if {t.lower().strip(",;:") for t in tokens} & _FINITE:
        return None
    informative = re.search(r"\d", s) or any(t[:1].isupper() and t.strip(",") not in _NOT_NAMES for t in tokens[1:]) \
        or tokens[0].lower() in _FRAGMENT_START
    return s if informative else None


def rewrite_message(sentences: Sequence[str], known: Optional[Dict[str, str]] = None,
                    context: str = "") -> List[Tuple[str, str]]:
    """(sentence, fact) pairs for one message's ``sentences``, in order. A sentence about "it"
    refers to the last thing the user said they have or got in the message; ``context`` is the
    assistant's message before (see ``rewrite_sentence``)."""
    out: List[Tuple[str, str]] = []
    previous, thing = "", None
    # the last sentence that introduced a person, while the sentences after it open with the same
    # he or she ("My gf Efua says ... She drives a Kia. She works as a pharmacist.")
    anchor, gender = "", ""
    for sentence in sentences:
        clean = _strip_openers(clean_chat_text(sentence))
        starts = _PRONOUN_START.match(clean)
        pronoun = starts.group(1).lower().split("'")[0].split()[0] if starts else ""
        chained = pronoun in ("he", "she") and anchor and not _FIRST.search(clean) \
            and not any(_introduced(previous)) and gender in ("", pronoun)
        facts = rewrite_sentence(sentence, anchor if chained else previous, known, context)
        if any(_introduced(sentence)):
            anchor, gender = sentence, ""
        elif pronoun in ("he", "she") and anchor and gender in ("", pronoun):
            gender = pronoun
        else:
            anchor, gender = "", ""
        stated = bool(facts)
        fragment = None if facts or not out or out[-1][0] != previous else _fragment(sentence)
        if fragment:  # "I started making gluten-free bread! Only on Saturdays for now": one fact
            lead = fragment.split()[0].lower()
            head = fragment[0].lower() + fragment[1:] if lead in _FRAGMENT_START | _ADVERBS | {"a", "an", "the"} \
                else fragment
            out[-1] = (f"{previous} {sentence}", f"{out[-1][1].rstrip('.')}, {head}.")
            previous = sentence
            continue
        facts = facts or _thing_fact(sentence, thing)
        facts += [f for f in _clause_values(sentence, first_clause=stated) if f not in facts]
        out += [(sentence, fact) for fact in facts]
        said = _with_subject(clean_chat_text(sentence))
        if _FIRST.search(said):
            found = _THING.findall(said)
            thing = found[-1] if found else thing
        previous = sentence
    return out
