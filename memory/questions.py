"""Question cues by rule: the questions a user would ask to get a memory back.

Step 1 learns to retrieve a memory from any context, and the contexts that matter most at
chat time are questions ("Where do I live these days?"). The 135M base model writes poor
ones: for "The user is originally from Leeds." it sampled "What's your name?" and "What's my
name?"; for "The user is allergic to peanuts.", "What's the worst thing you've ever done?".
Trained as cues, those teach ``<recall>`` to point at the wrong memory.

Memories are stored in a regular form ("The user lives in Porto now.", "The user's sister
Marta lives in Madrid.", "Le Guin is the user's favourite author."), so a few grammar rules
turn one back into the first person and then into questions, in the manner of classic
rule-based question generation (wh-movement over the sentence's chunks):

- a yes/no question: "Do I live in Porto now?";
- a wh-question per answer chunk: the complement of "be" ("What is my name?"), a place
  ("Where do I live now?"), a time ("When do I take Portuguese lessons?"), a frequency
  ("How often do I go bouldering?"), a companion ("Who do I share the flat with?"), the
  object ("What did I get as a present?"), a named thing ("Which company do I work for?",
  "What is my dog called?");
- the subject of a sentence about someone else ("Who lives in Madrid?"), with and without
  the name the user gave ("Where does my sister live?");
- a past event, when it happened, without the sentence's own time words ("Melanie ran a charity
  race last Saturday." -> "When did Melanie run a charity race?"): the memory's date answers it;
- a long sentence (a comma, a second clause) is asked about its main clause only: its object
  ("What did Caroline attend recently?") and, for an event, when.

A question is kept only if it still holds a content word of the memory, and a question the
rules give for two memories of the same user is dropped from both (it cannot tell them
apart). A memory the rules cannot parse gets no question; nothing is generated, so the cues
cost no model time and are the same on every run.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from memory.rewrite import _ADVERBS, IRREGULAR_PAST

_BE = {"am", "is", "are", "was", "were"}
_AUX = {"can", "could", "will", "would", "should", "must", "might", "may", "have", "has", "had", "do", "does",
        "did"}
_NEG = {"don't": "do", "doesn't": "does", "didn't": "did", "can't": "can", "won't": "will", "isn't": "is",
        "aren't": "are", "wasn't": "was", "haven't": "have", "hasn't": "has", "am not": "am"}
_PAST_BASE = {**IRREGULAR_PAST, "had": "have", "did": "do"}
_PREPS = ("instead of", "apart from", "because of", "in", "at", "to", "from", "near", "on", "with", "for", "as",
          "by", "about", "before", "after", "during", "since", "until", "into", "of", "without", "like", "over")
_TIME_PREPS = {"before", "after", "during", "since", "until", "over"}
_PLACE_PREPS = {"in", "at", "to", "from", "near", "into", "on"}
_TIME_WORD = re.compile(
    r"\b(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday|weekends?|weekdays?|mornings?|evenings?|"
    r"afternoons?|nights?|january|february|march|april|may|june|july|august|september|october|november|"
    r"december|spring|summer|autumn|fall|winter|days?|weeks?|months?|years?|\d{4}|o'clock|\d+(?:am|pm)|noon|"
    r"christmas|easter|holidays?)\b", re.I)
_FREQUENCY = re.compile(r"^(?:once|twice|\w+ times|(?:one|two|three|four|five|six|seven|\d+) (?:days?|nights?|"
                        r"evenings?|mornings?|times)|every \w+(?: \w+)?|daily|weekly|monthly|each \w+)"
                        r"(?: (?:a|per|each) \w+)?$", re.I)
_TRAIL = re.compile(r"\s+(now|these days|anymore|any more|still|too|at the moment|nowadays|more|again|"
                    r"yesterday|this year|last year|this week|last week|recently|lately)$", re.I)
_CALLED = re.compile(r"^(?:an?|the|my)\s+(?:[\w-]+\s+)*?([\w-]+)\s+(?:called|named)\s+(.+)$", re.I)
_STOP = frozenset(
    "i me my mine myself you your a an the and or but of to in on at for with from as by about into near do does "
    "did don't doesn't didn't am is are was were be been being have has had get got go goes went what who where "
    "when which how often many much why is not no yes it its this that these those there here now still anymore "
    "more too again also very really just can could will would should may might must one thing things "
    "called named".split())
_WORD = re.compile(r"[a-z0-9']+")


def _stem(word: str) -> str:
    word = word.removesuffix("'s")
    for suffix, repl in (("ies", "y"), ("ing", ""), ("ed", ""), ("sses", "ss"), ("shes", "sh"), ("ches", "ch"),
                         ("xes", "x"), ("oes", "o"), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 2 and not word.endswith("ss"):
            word = word[:-len(suffix)] + repl
            break
    return word[:4]


def _content(text: str) -> set:
    """Stems of the content words ("lives" and "live" share one)."""
    return {_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOP and len(w) > 1}


def _base_of_third(verb: str) -> str:
    """'lives' -> 'live', 'goes' -> 'go', 'studies' -> 'study', 'has' -> 'have', 'is' -> 'am'."""
    low = verb.lower()
    special = {"is": "am", "has": "have", "does": "do", "doesn't": "don't", "hasn't": "haven't", "isn't": "am not",
               "was": "was", "wasn't": "wasn't"}
    if low in special:
        return special[low]
    if low.endswith("ies") and len(low) > 4:
        return low[:-3] + "y"
    if low.endswith(("sses", "shes", "ches", "xes", "zes", "oes")):
        return low[:-2]
    if low.endswith("s") and not low.endswith("ss") and len(low) > 2:
        return low[:-1]
    return low


def _base_of_past(verb: str) -> Optional[str]:
    low = verb.lower()
    if low in _PAST_BASE:
        return _PAST_BASE[low]
    if not low.endswith("ed") or low.endswith("eed") or len(low) < 4:  # "need", "proceed": present
        return None
    stem = low[:-2]
    if stem.endswith("i"):
        return stem[:-1] + "y"  # studied
    if len(stem) > 2 and stem[-1] == stem[-2] and stem[-1] not in "lsfz":
        return stem[:-1]  # stopped
    if stem.endswith(("v", "c", "u", "z", "g")) or re.search(r"[^aeiou]l$|[rnl]s$", stem) or re.search(
            r"[aeiou][^aeiouwxy]$", stem) and not re.search(r"[aeiou]{2}[^aeiou]$|e[rn]$|[aeiou]t$", stem):
        return stem + "e"  # moved, cycled, liked, used
    return stem


def _is_verb(word: str) -> bool:
    low = word.lower()
    return (low in _BE or low in _AUX or low in _NEG or low in IRREGULAR_PAST or low.endswith("ed")
            or (low.endswith("s") and not low.endswith("ss") and low.isalpha() and len(low) > 2))


def first_person(fact: str) -> Optional[str]:
    """The fact as the user would say it ("The user's sister Marta lives in Madrid." -> "My
    sister Marta lives in Madrid."); None when the fact does not mention the user."""
    text = fact.strip().rstrip(".!")
    if not re.search(r"\bthe user\b", text, re.I):
        return None
    words = text.split()
    out: List[str] = []
    i = 0
    while i < len(words):
        w, low = words[i], words[i].lower()
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if low == "the" and nxt.lower() in ("user", "user's"):
            if nxt.lower() == "user's":
                out.append("My" if i == 0 else "my")
                i += 2
                continue
            j = i + 2
            while j < len(words) and words[j].lower() in _ADVERBS:
                j += 1
            verb = words[j] if j < len(words) else ""
            if _is_verb(verb) or verb.lower() in ("doesn't", "isn't"):
                out.append("I")
                out.extend(words[i + 2:j])
                base = _base_of_third(verb)
                out.extend(base.split())
                i = j + 1
            else:
                out.append("me")
                i += 2
            continue
        if low in ("their", "theirs", "them", "themselves", "themself", "they"):
            rep = {"their": "my", "theirs": "mine", "them": "me", "themselves": "myself", "themself": "myself"}
            if low == "they":
                out.append("I")
                if nxt and nxt.lower() in ("are", "were", "have"):
                    out.append({"are": "am", "were": "was", "have": "have"}[nxt.lower()])
                    i += 2
                    continue
            else:
                out.append(rep[low])
            i += 1
            continue
        out.append(w)
        i += 1
    return " ".join(out)


_FREQ_IN = re.compile(r"\s+((?:once|twice|\w+ times|(?:one|two|three|four|five|six|seven|\d+) (?:days?|nights?|"
                      r"evenings?|mornings?)) (?:a|per|each) \w+|every \w+)$", re.I)
_PARTICLES = frozenset("down up out off back away over around along".split())
_CATENATIVE = frozenset("want wants wanted like likes liked love loves loved hate hates hated need needs needed "
                        "plan plans planned try tries tried hope hopes hoped learn learns learned decide decides "
                        "decided start starts started begin begins began prefer prefers preferred".split())
_NOUN_AFTER_TO = re.compile(r"^(?:[A-Z0-9].*|a|an|the|my|his|her|their|our|this|that|these|those|some|work|school|"
                            r"bed|church|town|class|college|university|uni|hospital|home)$")
_PARTICIPLE = re.compile(r"^(?:\w+ed|been|done|gone|seen|taken|given|known|grown|written|eaten|begun|become|come|"
                         r"got|gotten|made|had|met|lost|found|left|bought|kept|felt|heard|read|run|won)$", re.I)
_CLAUSE = re.compile(r"\s(?:and|or|while|so|because|when|if|that|who|which|whose|where|though|although|-)\s",
                     re.I)
_NOT_SUBJECT = frozenset("I The A An My It This That These Those There He She They We You Our Your His Her Their "
                         "Its Who What When Where Why How".split())
_ONE_TIME = re.compile(r"^(?:yesterday|this year|last year|this week|last week|recently|lately)$", re.I)


def _split_chunks(rest: str) -> List[Tuple[str, str]]:
    """The words after the verb as (preposition, phrase) chunks; the object has preposition '',
    a frequency ("twice a week") has preposition '~'."""
    words = rest.split()
    chunks: List[Tuple[str, List[str]]] = [("", [])]
    i = 0
    while i < len(words):
        two = " ".join(words[i:i + 2]).lower()
        prep = two if two in _PREPS else (words[i].lower() if words[i].lower() in _PREPS else None)
        if prep == "to" and i + 1 < len(words) and not _NOUN_AFTER_TO.match(words[i + 1]) and (
                not words[i + 1].endswith("s") or words[i + 1].endswith("ss")):
            prep = None  # "keen to spread": an infinitive ("allergic to peanuts": a plural noun)
        if prep and (chunks[-1][1] or chunks[-1][0] == ""):
            if chunks[-1][1]:
                chunks.append((prep, []))
            else:
                chunks[-1] = (prep, [])
            i += len(prep.split())
            continue
        chunks[-1][1].append(words[i])
        i += 1
    out: List[Tuple[str, str]] = []
    for prep, ws in chunks:
        phrase = " ".join(ws)
        m = _FREQ_IN.search(" " + phrase)
        if m and prep in ("", "~"):
            head = (" " + phrase)[:m.start()].strip()
            if head:
                out.append((prep, head))
            out.append(("~", m.group(1)))
        elif phrase:
            out.append((prep, phrase))
    return out


def _wh_for(prep: str, phrase: str, right_after_verb: bool) -> Optional[Tuple[str, bool]]:
    """(wh-word, whether the preposition stays at the end) for a prepositional chunk."""
    if prep == "~" or _FREQUENCY.match(phrase):
        return "How often", False
    if prep in _TIME_PREPS or (prep in ("in", "on", "at") and _TIME_WORD.search(phrase)):
        return "When", False
    if prep in _PLACE_PREPS and (phrase[:1].isupper() or prep in ("at", "from", "near") or right_after_verb
                                 or phrase.lower().startswith(("home", "work", "the "))):
        if prep == "to" and not right_after_verb:
            return None  # "a trip to Iceland" is the object's, not the verb's
        return "Where", prep == "from"
    if prep == "with":
        return "Who", True
    if prep in ("to", "of", "about", "like", "for", "as", "by"):
        return ("Who" if phrase[:1].isupper() else "What"), True
    return None


def _join(*parts: str) -> str:
    return re.sub(r"\s+", " ", " ".join(p for p in parts if p)).strip()


def _subject(words: List[str]) -> Optional[Tuple[str, int]]:
    """(subject, index of the word after it): 'I', 'my sister Marta', or a name ('Caroline',
    "Melanie's kids") for facts about a named person."""
    if words[0] == "I":
        return "I", 1
    name = 0
    while name < len(words) and re.match(r"^[A-Z][a-z]+(?:'s)?$", words[name]) and words[name] not in _NOT_SUBJECT:
        name += 1
        if words[name - 1].endswith("'s"):
            break
    if words[0] != "My" and name == 0:
        return None
    if name and not words[name - 1].endswith("'s"):
        return " ".join(words[:name]), name  # "Caroline joined ..."
    j = 1 if words[0] == "My" else name
    start = j
    while j < len(words) and not (words[j].lower() in _ADVERBS
                                  or (j > start and words[j][:1].islower() and _is_verb(words[j]))
                                  or (j > start and words[j - 1][:1].isupper() and words[j][:1].islower())
                                  or (j > start and _plural_noun(words[j - 1]) and _plain_verb(words[j]))):
        j += 1
    head = "my" if words[0] == "My" else " ".join(words[:name])
    return _join(head, *words[start:j]), j


_DETERMINERS = frozenset("a an the my his her their our your this that these those some any every each no all both "
                         "and or of".split())
# nouns for people: a capitalised complement after one of them is a person ("My boyfriend is Tiago" -> "Who ...")
_PERSON_NOUNS = frozenset(
    "boyfriend girlfriend partner husband wife fiance fiancé fiancee fiancée spouse sister brother sibling mother "
    "father mum mom dad mummy daddy parent son daughter child kid baby grandmother grandfather grandma grandpa granny "
    "grandson granddaughter aunt uncle cousin niece nephew friend flatmate roommate housemate neighbour neighbor "
    "colleague coworker boss manager mentor teacher tutor coach doctor dentist therapist author writer singer "
    "artist actor actress player hero idol landlord landlady".split())


_PRONOUNS = frozenset("i me you he him she her it we us they them who whom which that what whose".split())


def _plural_noun(word: str) -> bool:
    """A lower-case plural noun ("parents", "kids"), not "bus" or "glass"."""
    return word.isalpha() and word.islower() and len(word) > 3 and word.endswith("s") and not word.endswith(
        ("ss", "us", "is"))


_NOT_A_VERB = _DETERMINERS | _PRONOUNS | frozenset(p for p in _PREPS if " " not in p)


def _plain_verb(word: str) -> bool:
    """A lower-case word that can be a plural subject's verb ("live", "love", "moved"): not a
    preposition, determiner, pronoun or adverb."""
    return word.isalpha() and word.islower() and word not in _NOT_A_VERB and word not in _ADVERBS


def _verb_group(verb: str, tail: List[str], subj: str, singular: bool, neg: bool):
    """(auxiliary, main verb, words after them) of an inverted question, for a verb already
    stripped of its negation (``neg``): "I live" -> ("do", "live"), "my sister Marta lives" ->
    ("does", "live"), "I am reading" -> ("am", "reading"), "I don't have" -> ("do", "have"),
    "I want to chat" -> ("do", "want to chat")."""
    past = verb in ("was", "were", "did", "had") or _base_of_past(verb) is not None
    if verb in _BE:
        aux = ("was" if past else "am") if subj == "I" else (
            ("was" if past else "is") if singular else ("were" if past else "are"))
        main = ""
        if tail and tail[0].lower().endswith("ing"):
            main, tail = tail[0], tail[1:]  # "am reading Piranesi"
    elif verb in ("can", "could", "will", "would", "should", "must", "might", "may") or (
            neg and verb in ("do", "does", "did")) or (
            verb in ("have", "has", "had") and tail and _PARTICIPLE.match(tail[0])):
        aux = verb
        main, tail = (tail[0], tail[1:]) if tail else ("", tail)
    else:
        if past:
            aux, main = "did", _base_of_past(verb) or verb
        else:
            aux = "does" if singular else "do"
            main = _base_of_third(verb) if singular else verb
        if main in ("has", "had"):
            main = "have"
    while tail and (tail[0].lower() in _PARTICLES or (main in _CATENATIVE or verb in _CATENATIVE)
                    and tail[0].lower() == "to" and len(tail) > 1 and main.split()[-1:] != ["to"]):
        take = 2 if tail[0].lower() == "to" else 1
        main, tail = _join(main, *tail[:take]), tail[take:]
    return aux, main, tail


def _wh_questions(chunks: List[Tuple[str, str]], lead: Tuple[str, ...], copula: bool, trail: str) -> List[str]:
    """A wh-question per answer chunk: ``lead`` is (auxiliary, subject, adverbs, main verb);
    ``copula``: the verb is "be" with no main verb ("My name is Alex")."""
    out: List[str] = []
    subj = lead[1]
    def said(skip) -> str:  # the other chunks as they read in the question
        return " ".join(_join(p if p != "~" else "", ph) for n, (p, ph) in enumerate(chunks) if n not in skip)

    for k, (prep, phrase) in enumerate(chunks):
        others = said({k})
        if prep == "":
            if k != 0 or (len(phrase.split()) == 1 and phrase.lower().endswith("ing")):
                continue
            if copula:
                if re.match(r"^(?:\d+|an?|one|\w+ty(?:-\w+)?) years? old$", phrase, re.I):
                    out.append(_join("How old", *lead, others, trail) + "?")  # "How old am I?"
                    continue
                if re.match(r"^(?:called|named) ", phrase, re.I):
                    out.append(_join("What", *lead, phrase.split()[0].lower(), others, trail) + "?")
                    continue  # "My sister is called Marta" -> "What is my sister called?"
                if subj == "I":
                    continue  # "I am pescatarian" -> "What am I?" asks nothing
                head = subj.split()[-1]
                person = head[:1].isupper() or head.lower() in _PERSON_NOUNS
                wh = "Who" if phrase[:1].isupper() and person else "What"
                out.append(_join(wh, *lead, others, trail) + "?")
                continue
            called = _CALLED.match(phrase)
            if called:
                noun = called.group(1)
                out.append(_join("What", "is", "my", noun, "called") + "?")
                out.append(_join("Which", noun, *lead, others, trail) + "?")
                continue
            if phrase[:1].isdigit():
                continue
            if len(chunks) > 1 and chunks[1][0] in ("to", "of"):
                # "a trip to Iceland": the chunk belongs to the object that is asked for
                others = said({0, 1})
            ws = phrase.split()
            if 1 < len(ws) <= 3 and _plural_noun(ws[-1]) and all(
                    w.isalpha() and w.lower() not in _DETERMINERS and w.lower() not in _STOP
                    and not w.lower().endswith("ing") and not _is_verb(w) for w in ws[:-1]):
                # a bare plural object: "works normal office hours" -> "What hours do I work?"
                out.append(_join("What", ws[-1], *lead, others, trail) + "?")
                continue
            out.append(_join("What", *lead, others, trail) + "?")
            continue
        found_wh = _wh_for(prep, phrase, k == 0)
        if found_wh is None or prep in ("instead of", "apart from", "because of", "without"):
            continue
        wh, stranded = found_wh
        if k > 0 and prep in ("as", "for", "by", "like") and chunks[0][0] == "":
            continue  # "got a record player as a present": the object is the answer
        called = _CALLED.match(phrase)
        if called and wh in ("Who", "What"):
            out.append(_join("Which", called.group(1), *lead, others, prep, trail) + "?")
        out.append(_join(wh, *lead, others, prep if stranded else "", trail) + "?")
    return out


_TIME_TAIL = re.compile(r"\s*(?:,\s*)?(?:(?:last|this|next|that|one|every) \w+|yesterday|today|tonight|recently|lately|"
                        r"earlier|(?:\w+ )?(?:days?|weeks?|months?|years?) ago|(?:on|in|at|during|since|before|after|"
                        r"over|by) (?:the |a |an |this |that |last |next )?\S+(?: \S+)?)$", re.I)


def _strip_time(rest: str) -> str:
    """``rest`` without its trailing time phrases: "a charity race last Saturday" -> "a charity race"."""
    while True:
        m = _TIME_TAIL.search(rest)
        if not m or (m.group(0).split()[0].lower() in ("on", "in", "at", "over", "by")
                     and not _TIME_WORD.search(m.group(0))):
            return rest.strip()
        rest = rest[:m.start()]


def _main_clause(rest: str) -> Tuple[str, str]:
    """(the words before the first comma or subordinate/coordinate clause, their trailing
    "recently"/"now"-like word): "an LGBTQ support group recently and found the stories
    inspiring" -> ("an LGBTQ support group", "recently")."""
    cut = min([i for i in (rest.find(","), _first_clause(rest)) if i >= 0], default=len(rest))
    head = rest[:cut].strip()
    m = _TRAIL.search(" " + head)
    if m:
        return (" " + head)[:m.start()].strip(), m.group(1)
    return head, ""


def _first_clause(rest: str) -> int:
    m = _CLAUSE.search(f" {rest} ")
    return -1 if m is None else max(m.start() - 1, 0)


def _questions_from(sentence: str) -> List[str]:
    """Questions for one first-person sentence (or one about a named person)."""
    trail, core = "", sentence
    m = _TRAIL.search(sentence)
    if m:
        trail, core = m.group(1), sentence[:m.start()]
    # "<X> is/are my <NP>": "Le Guin is my favourite author" -> "Who is my favourite author?"
    m = re.match(r"^(.+?) (is|are|was|were) (my .+)$", core)
    if m and m.group(1) != "I" and not m.group(1).lower().startswith(("i ", "my ")) and " and " not in core:
        wh = "Who" if m.group(1)[:1].isupper() and not m.group(1).startswith(("The ", "A ", "An ")) else "What"
        return [_join(wh, m.group(2), m.group(3), trail) + "?"]
    words = core.split()
    found = _subject(words) if words else None
    if found is None:
        return []
    subj, j = found
    if j < len(words) and words[j].lower() in ("and", "or", "&"):
        return []  # "Caroline and her mentee had ...": a compound subject
    verb_at = j
    # "my sister Marta", "my new flat": singular; "my parents": plural
    singular = subj != "I" and (subj.split()[-1][:1].isupper() or not subj.endswith("s"))
    adverbs: List[str] = []
    while j < len(words) and words[j].lower() in _ADVERBS:
        adverbs.append(words[j])
        j += 1
    if j >= len(words):
        return []
    verb, tail = words[j].lower(), words[j + 1:]
    neg = verb in _NEG or verb.endswith("n't")
    if neg:
        verb = _NEG.get(verb, verb[:-3])
    if tail[:1] and tail[0].lower() == "not":
        neg, tail = True, tail[1:]
    while tail and tail[0].lower() in _ADVERBS:
        adverbs.append(tail.pop(0))
    aux, main, tail = _verb_group(verb, tail, subj, singular, neg)
    adv = " ".join(adverbs)
    rest = " ".join(tail)
    out = [_join(aux.capitalize(), subj, adv, main, rest, trail) + "?"]
    if neg:
        return out  # a negated fact gets its yes/no question only
    lead = (aux, subj, adv, main)
    copula = verb in _BE and not main
    chunks = _split_chunks(rest)
    if len(chunks) <= 3 and "," not in rest and not _CLAUSE.search(f" {rest} "):
        out += _wh_questions(chunks, lead, copula, trail)
        main_rest, main_trail = rest, trail
    else:  # a long fact: its main clause (before the first comma or clause) still has an object to ask for
        main_rest, main_trail = _main_clause(rest)
        main_chunks = _split_chunks(main_rest) if main_rest else []
        if main_chunks and main_chunks[0][0] == "" and not copula and " to" not in f" {main}":
            out += _wh_questions(main_chunks[:1], lead, False, main_trail)  # "What did Caroline attend recently?"
    if _ONE_TIME.match(main_trail) or (aux == "did" and not any(q.startswith("When ") for q in out)):
        # a past event: the user may ask when it happened ("When did Caroline attend an LGBTQ support
        # group?"), and the memory's date answers it; its own time words stay out of the question
        event = _strip_time(main_rest)
        if event:
            out.append(_join("When", *lead, event) + "?")
    # the subject of a sentence about someone else: "Who lives in Madrid?"
    if subj != "I" and re.search(r"\b[A-Z][a-z]+$", subj):
        out.append(_join("Who", " ".join(words[verb_at:]), trail) + "?")
        relation = " ".join(subj.split()[:-1])  # "my sister"
        if relation.startswith("my "):
            out.extend(q.replace(subj, relation) for q in list(out) if subj in q)
    return [q[0].upper() + q[1:] for q in out]


def template_questions(fact: str) -> List[str]:
    """Rule-made questions for one memory (may be empty); each keeps a content word of it."""
    sentence = first_person(fact)
    if sentence is None:  # about a named person ("Caroline joined ..."): asked about by name
        sentence = fact.strip().rstrip(".!")
    facts_words = _content(fact.replace("the user", ""))
    kept: List[str] = []
    for q in _questions_from(sentence):
        q = re.sub(r"\s+([?,])", r"\1", q)
        if q not in kept and _content(q) & facts_words and 3 <= len(q.split()) <= 25:
            kept.append(q)
    return kept


def template_cues(records: Iterable) -> Dict[int, List[str]]:
    """Rule-made questions per record id; a question made for two memories of one user is
    dropped from both."""
    made = {r.id: template_questions(r.text) for r in records}
    users = {r.id: r.user_id for r in records}
    owners: Dict[Tuple[str, str], set] = defaultdict(set)
    for rid, qs in made.items():
        for q in qs:
            owners[(users[rid], q.lower())].add(rid)
    return {rid: [q for q in qs if len(owners[(users[rid], q.lower())]) == 1] for rid, qs in made.items()}


_TO_YOU = {"i": "you", "me": "you", "my": "your", "mine": "yours", "myself": "yourself", "am": "are",
           "i'm": "you're", "i've": "you've", "i'd": "you'd", "i'll": "you'll", "was": "were", "wasn't": "weren't"}


def second_person(fact: str) -> Optional[str]:
    """The fact said back to the user ("The user's sister Marta lives in Madrid." -> "Your sister
    Marta lives in Madrid."); None when the fact does not mention the user. ``was`` becomes
    ``were`` only right after "I" ("I was" -> "You were"; "My flat was" stays)."""
    first = first_person(fact)
    if first is None:
        return None
    words = first.split()
    out: List[str] = []
    for i, w in enumerate(words):
        core = w.rstrip(",;:")
        low = core.lower()
        if low in ("was", "wasn't") and (i == 0 or words[i - 1].lower() != "i"):
            out.append(w)
            continue
        if low in _TO_YOU:
            new = _TO_YOU[low]
            new = new[0].upper() + new[1:] if i == 0 else new
            out.append(new + w[len(core):])
        else:
            out.append(w)
    return " ".join(out) + "."


def said_back(fact: str) -> str:
    """What the answer after a recall says: the fact in the second person when it is about the
    user ("Your sister Marta lives in Madrid."), else the fact as stored ("Caroline went to a
    support group on 7 May 2023."). Either way nothing that is not in the memory."""
    return second_person(fact) or fact.strip()


__all__: Sequence[str] = ("first_person", "second_person", "said_back", "template_questions", "template_cues")
