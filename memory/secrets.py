"""Keep secrets out of memories and training data.

A memory is trained into weights that cannot be edited line by line, so a password, API key,
card number, IBAN or private key must never become one, nor a cue or an SFT example.
``SecretFilter.find(text)`` returns the *types* found (never the values); callers drop the
item and log the types.

Detectors (``--secret_filter``):

- ``library`` (default): the maintained detectors where PyPI has them: detect-secrets' pattern
  plugins (cloud, VCS, chat and payment-provider tokens, private keys, JWTs, basic-auth URLs),
  and python-stdnum's checksums for card numbers (Luhn) and IBANs (mod 97), plus our own rules:
  provider key formats detect-secrets 1.5 lacks (see ``_PROVIDER``) and credentials stated in
  words (``stated_credentials``: "my password is ...", "pw: ...", "X is my PIN", "logs in with X
  as their password", "login: alice / Tulip42", "the wifi password X is on the fridge").
- ``regex``: the hand-written baseline the benchmark compares to (``python -m
  bench.secrets_filter``): a few token patterns and one "<credential word> is <value>" regex,
  no checksums. Kept as it was so the benchmark measures the gain.
- ``off``.

Decisions (documented because the line is not obvious):

- A credential word only counts next to a value that looks like one; the value's shape depends
  on the word: a PIN, door/alarm/safe code or CVV must contain digits, an API key/token must be
  key-shaped (8+ characters mixing letters and digits), a password may be any word that is not
  a predicate ("the password is too short", "... is written on the fridge", "... expired").
- Bare "key", "token" and "secret" are ordinary words ("the key is under the mat", "a token of
  thanks", "secret ingredient"): they count only before a key-shaped value of 16+ characters.
  A physical key is not a secret.
- "pass" counts only as "pass: X" / "pass = X", "user/pass", or "<wifi|admin|...> pass is X"
  with a password-shaped value; never after bus/ski/boarding/day/season... ("a bus pass").
- Stripe publishable keys (``pk_live_``/``pk_test_``) are public by design but are dropped too:
  a memory loses nothing by not holding one, and users mix them up with secret keys.
- One-time codes (verification, 2FA, recovery codes) count as credentials.
- Usernames and e-mail addresses alone are not secrets; a "user / password" pair is.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Dict, Iterable, List, Optional

logger = logging.getLogger(__name__)

DETECTORS = ("library", "regex", "off")

# the baseline's rule for credentials stated in words: "my password is X", "PIN: 1234"
_STATED = re.compile(
    r"\b(?:password|passwd|passcode|passphrase|pass\s*word|pin(?:\s*code)?|api[\s_-]?key|access[\s_-]?key|"
    r"secret[\s_-]?key|auth(?:entication)?[\s_-]?token|access[\s_-]?token|token|private[\s_-]?key|"
    r"security\s+code|cvv|cvc)\b"
    r"(?:\s+(?:for|to|of|on|at)(?:\s+[\w.-]+){1,3}?)?"
    r"\s*(?:is|was|=|:|are)\s*[\"'`]?(?!(?:a|an|the|not|too|very|so|really|my|your|strong|weak|long|short|"
    r"secret|private|safe|same|different|new|old|required|expired|reset|changed|set)\b)([^\s\"'`]{3,})",
    re.IGNORECASE)

# ------------------------------------------------------------------ credentials stated in words
# Credential words by the shape their value must have (see the module docstring).
_KINDS = {
    "password": r"pass(?:word|wd|code|phrase|key)s?|pass[ -](?:word|phrase)s?|pwd|pw|p/w|"
                r"(?:wi-?fi|wpa2?|wep|network|router)[ -]key",
    "pass": r"pass",
    "pin": r"pin(?:[ -]?(?:code|number|no\.?))?s?|pincode|(?:(?:front|back|side|main)[ -])?"
           r"(?:door|gate|garage|alarm|safe|entry|entrance|access|lock|lockbox|key[ -]?safe|key[ -]?box|keypad|"
           r"building|locker|padlock|security|unlock|intercom|buzzer|apartment|elevator|"
           r"verification|2fa|two[ -]factor|mfa|otp|one[ -]time|backup|recovery|login|sign[ -]?in|wi-?fi|router|"
           r"sim|voicemail|atm|vault|storage[ -]unit|shed)[ -]codes?|"
           r"codes?\s+(?:for|to|of|on|at)\s+(?:(?:get\s+in(?:to)?|open|unlock|enter|access|disarm|turn\s+off)\s+)?"
           r"(?:(?:the|my|your|his|her|their|our|[\w-]+['’]s)\s+){0,2}"
           r"(?:(?:front|back|side|main|garage|building|apartment)\s+)?(?:door|gate|garage|alarm|safe|building|"
           r"lockbox|keypad|locker|padlock|lock|entrance|apartment|flat|house|office|vault|phone|laptop|shed)s?|"
           r"passcodes?|unlock\s+pattern",
    "combination": r"(?:lock|safe|locker|padlock|bike[ -]lock|vault)?\s*combination",
    "cvv": r"cvv2?|cvc2?|csc|card\s+security\s+code|security\s+code\s+on\s+(?:the|my|their|his|her)\s+card",
    "key": r"api[ _-]?(?:keys?|tokens?|secrets?)|apikey|secret[ _-]?(?:access[ _-]?)?keys?|access[ _-]?keys?(?:[ _-]?id)?|"
           r"access[ _-]?tokens?|auth(?:entication|orization)?[ _-]?(?:tokens?|keys?)|bearer(?:[ _-]?tokens?)?|"
           r"refresh[ _-]?tokens?|client[ _-]?secrets?|app[ _-]?secrets?|shared[ _-]?secrets?|webhook[ _-]?secrets?|"
           r"signing[ _-]?(?:keys?|secrets?)|private[ _-]?keys?|personal[ _-]?access[ _-]?tokens?|"
           r"session[ _-]?(?:tokens?|keys?|cookies?)|bot[ _-]?tokens?|deploy[ _-]?(?:keys?|tokens?)|"
           r"(?:aws|openai|stripe|github|gitlab|slack|google|twilio|sendgrid|npm|pypi|hugging ?face|hf|"
           r"anthropic|azure|gcp|heroku|mailgun|mailchimp|discord|telegram|cloudflare|datadog|vercel|netlify|"
           r"digitalocean|shopify|notion|linear|openrouter|groq|mistral|cohere|replicate)[ _-]?(?:keys?|tokens?|secrets?)",
    "token": r"tokens?",
    "bare": r"keys?|secrets?",
    "phrase": r"(?:wallet[ -])?(?:seed|recovery|secret|mnemonic|backup)[ -]?(?:phrase|words)|mnemonic|wallet[ -](?:seed|phrase)|"
              r"security[ -]answer|answer\s+to\s+(?:(?:the|my|your|his|her|their|our|[\w-]+['’]s)\s+)?security\s+question",
}
_KW = {k: re.compile(rf"(?<![\w/-])(?:{v})(?![\w/-])", re.IGNORECASE) for k, v in _KINDS.items()}
_ALL_KW = "|".join(f"(?:{v})" for k, v in _KINDS.items() if k != "bare")

_DET = r"(?:(?:my|your|his|her|their|our|its|the|this|that|[\w-]+['’]s)\s+)"
# "for the user's home wifi", "(router)": words between a credential word and its connector
_QUAL = r"(?:\s+(?:for|to|of|on|at|in|into|with)\s+(?:[\w.@&'’-]+\s+){0,4}?[\w.@&'’-]+|\s*\([^()\n]{1,40}\))?"
# the same, one compiled pattern per length, to try each ("the password to his router is X")
_QUALS = [re.compile(r"\s*\([^()\n]{1,40}\)")] + [
    re.compile(rf"\s+(?:for|to|of|on|at|in|into|with)\s+(?:[\w.@&'’-]+\s+){{{k}}}[\w.@&'’-]+", re.IGNORECASE)
    for k in range(8)]
# strong connectors: any password-like word may follow
_CONN = re.compile(
    r"(?P<c>\s*(?::=|=>|->|=|:)\s*|\s+[-–—]+\s+|,?\s+(?:which|that)\s+(?:is|was)\s+|\?\s*(?:it['’]s|it\s+is)\s+|"
    r"\s+(?:is|was|are|were|remains|reads|would\s+be|will\s+be)(?:\s+(?:now|still|currently|just|simply|actually|always))?"
    r"(?:\s+set\s+to)?\s*[:-]?\s*|"
    r"\s+(?:has\s+been\s+|have\s+been\s+|was\s+|is\s+|got\s+|were\s+)?(?:changed|set|reset|updated|switched)\s+to\s+|"
    r"\s+(?:as|of|to)\s+|['’]s\s+|(?P<weak>\s*[,(]\s*|\s+))", re.IGNORECASE)
_VALUE = re.compile(r"\"([^\"\n]{1,200})\"|“([^”\n]{1,200})”|'([^'\n]{1,200})'(?![A-Za-z])|‘([^’\n]{1,200})’|"
                    r"`([^`\n]{1,200})`|(\S+)")
_TRAIL = ".,;:!?)]}>\"'’”"
_STOP = set("""
a an the this that these those it its it's itself my mine your yours his her hers their theirs our ours one ones
not no none never too very so really quite rather pretty also still now just only always usually currently actually
simply probably already even then there here what which who whom whose where when why how whatever something
nothing anything everything someone somewhere everywhere nowhere unknown known secret private public safe unsafe
secure insecure strong weak long short simple easy hard difficult complex complicated tricky obvious correct
incorrect wrong right invalid valid good bad great terrible awful fine ok okay same different required optional
mandatory needed necessary sensitive case-sensitive due set reset default blank empty missing lost stolen weaker
stronger longer shorter harder easier enough sufficient insufficient important current similar identical random
generic standard temporary permanent unique personal shared common predictable guessable memorable unchanged
in on at under behind inside with without for from by of to into onto about above below near next over through
be is was are were been being and or but if as because since until while than like unlike via per
expire change update rotate include contain match meet follow comply protect prevent keep stay remain need have
has had get got use make reuse share write store save hide remember forget recall enter type yes
same-as whatever's unavailable impossible possible likely unlikely available necessary fake real
""".split())
_STOP_SUFFIX = re.compile(r"^[a-z-]{3,}(?:ed|able|ible|ful|less|ous)$|^[a-z-]{4,}ing$|^[a-z-]{5,}ive$|^[a-z-]{5,}(?<!f)ly$")
# shapes that are values but not credentials: prices, times, ordinals, versions, measures, percentages
_NOT_CREDENTIAL_SHAPE = re.compile(
    r"^(?:[$€£¥]\s?\d[\d,.]*[kKmM]?|\d[\d,.]*\s?(?:[$€£¥]|eur|usd|gbp|chf|k|m|bn|kg|km|g|gb|mb|tb|kb|mm|cm|m2|ml|l|h|hr|hrs|"
    r"min|mins|s|sec|am|pm|st|nd|rd|th|x|%|mph|kph|km/h|kcal|cal|lbs?|oz|ft|in|mi|yo|yrs?|°c|°f|°)|"
    r"\d{1,2}[:.]\d{2}(?:\s?[ap]m)?|v?\d+(?:\.\d+){1,3}[a-z]?|(?:[A-Za-z]\.){2,}|[A-Za-z]+['’][A-Za-z]+|"
    r"[A-Za-z]+/[A-Za-z]+|https?://\S+|www\.\S+|[\w.+-]+@[\w-]+\.[\w.]+)$", re.IGNORECASE)
_DATE = re.compile(r"^\d{1,4}[./-]\d{1,2}(?:[./-]\d{1,4})?$")
_UNIT_AFTER = re.compile(
    r"^\s*(?:-\s*)?(?:characters?|chars?|digits?|letters?|numbers?|symbols?|words?|long|%|percent|times?|days?|weeks?|"
    r"months?|years?|hours?|minutes?|seconds?|attempts?|tries|euros?|dollars?|pounds?|cents?|people|users?|"
    r"employees?|accounts?|places|positions|bits?|bytes?|per\b|or\s+more|or\s+longer|\+)", re.IGNORECASE)
_TRAVEL_PASS = re.compile(
    r"\b(?:bus|boarding|ski|day|season|hall|travel|rail|train|tram|metro|subway|transit|gym|museum|press|backstage|"
    r"weekly|monthly|annual|yearly|park|parking|festival|visitor|free|mountain|city|tourist|all[ -]access|vip|"
    r"student|senior|family|week|weekend|camping|fishing|hunting|golf|pool|zoo|theme[ -]park|event|concert|"
    r"mountain|toll|back|forward|hall|first|second|mountain|a|one|another|quick|no|fail|bypass|over|under)"
    r"[\s-]+$", re.IGNORECASE)
_TECH_PASS = re.compile(r"\b(?:wi-?fi|admin|router|root|login|account|email|e-mail|mail|db|database|server|ssh|vpn|"
                        r"ftp|user|my|your|his|her|their|our|portal|app|system|computer|laptop|pc|nas)[\s-]+$",
                        re.IGNORECASE)
# "X is <specific> password" must not be a generic statement ("123456 is the most common password")
_GENERIC_WORDS = re.compile(r"\b(?:most|least|common|popular|worst|best|weakest|strongest|typical|example|default|"
                            r"favourite|favorite|top|famous|classic|standard|usual|bad|good|terrible|first|last|"
                            r"another|any|every|each|new|old|previous)\b", re.IGNORECASE)


def _clean(match: "re.Match") -> tuple:
    """(value, quoted) of a _VALUE match."""
    for i in range(1, 6):
        if match.group(i) is not None:
            return match.group(i).strip(), True
    return match.group(6).rstrip(_TRAIL).lstrip("\"'“‘`(["), False


def _digits(v: str) -> int:
    return sum(c.isdigit() for c in v)


def _numeric(v: str, low: int, high: int = 12, separators: bool = False) -> bool:
    """A PIN- or code-like number: low..high digits (and # or *), dashes/dots/spaces when allowed."""
    pattern = r"[#*]?\d[\d\s./-]*\d[#*]?" if separators else r"[#*]?\d+[#*]?"
    return bool(re.fullmatch(pattern, v)) and low <= _digits(v) <= high and not _NOT_CREDENTIAL_SHAPE.match(v)


def _wordish(v: str) -> bool:
    """A plain word that is not a predicate, article or preposition: a password may be one."""
    low = v.lower()
    return len(v) >= 3 and low not in _STOP and not _STOP_SUFFIX.match(low) and not _NOT_CREDENTIAL_SHAPE.match(v) \
        and not re.fullmatch(r"\d+", v)


def _strong(v: str, dates: bool = False) -> bool:
    """Password-shaped: letters mixed with digits or symbols, or a passphrase of 3+ joined words."""
    if len(v) < 4 or _NOT_CREDENTIAL_SHAPE.match(v) or (not dates and _DATE.match(v)):
        return False
    has_letter = re.search(r"[A-Za-z]", v)
    if not has_letter:
        return False
    if re.search(r"\d", v) or re.search(r"[!@#$%^&*+=?~_|<>{}\[\]\\;]", v):
        return True
    return len(re.split(r"[-.]", v)) >= 3 and all(re.split(r"[-.]", v))


def _keyish(v: str, length: int) -> bool:
    """API-key-shaped: length+ characters of a token alphabet mixing letters and digits."""
    mixed = _digits(v) >= 2 or (len(v) >= 20 and _digits(v) and re.search(r"[a-z]", v) and re.search(r"[A-Z]", v))
    return len(v) >= length and bool(re.fullmatch(r"[A-Za-z0-9_\-./+=:]+", v)) and bool(mixed) and \
        bool(re.search(r"[A-Za-z]", v)) and not _NOT_CREDENTIAL_SHAPE.match(v) and not _DATE.match(v)


def _value_ok(kind: str, v: str, quoted: bool, strength: str) -> bool:
    """Whether ``v`` is a credential value for a credential word of ``kind``; ``strength`` is how
    plainly it was stated: 'strong' (is, :, =), 'weak' (adjacent, "as", "'s") or 'before' (value first)."""
    if not v:
        return False
    if kind == "password":
        if quoted:
            return not (" " in v and v.split()[0].lower() in _STOP)
        if strength == "strong":
            return _wordish(v) or _strong(v, dates=True) or _numeric(v, 3, 40, separators=True)
        return _strong(v) or _numeric(v, 4, 40)
    if kind == "pass":
        return _strong(v) or (strength in ("strong", "colon") and _numeric(v, 4)) or (quoted and len(v) >= 3) or \
            (strength == "colon" and _wordish(v))
    if kind == "pin":
        if quoted or strength == "strong":
            return _numeric(v, 3 if strength == "strong" else 4, 12, separators=True) or \
                (_strong(v) and _digits(v) >= 3)
        return _numeric(v, 4, 12) or (_strong(v) and _digits(v) >= 3)
    if kind == "combination":
        return strength == "strong" and _numeric(v, 3, 12, separators=True)
    if kind == "cvv":
        return _numeric(v, 3, 4)
    if kind == "key":
        return _keyish(v, 8 if strength == "strong" or quoted else 12)
    if kind == "token":
        return _keyish(v, 8 if strength == "strong" else 16)
    if kind == "bare":
        return _keyish(v, 16)
    if kind == "phrase":
        return quoted or (strength == "strong" and _wordish(v))
    return False


def _stated_after(text: str) -> bool:
    """<credential word> <connector> <value>: "password is X", "PIN: 1234", "pw X", "the wifi password
    X is on the fridge", "set the PIN to 4711"."""
    for kind, kw in _KW.items():
        for m in kw.finditer(text):
            if kind == "pass":
                before = text[max(0, m.start() - 30):m.start()]
                if _TRAVEL_PASS.search(before):
                    continue
            pos = m.end()
            ends = [pos] + [q.end() for q in (rx.match(text, pos) for rx in _QUALS) if q]
            for qual_end in ends:
                c = _CONN.match(text, qual_end)
                if not c:
                    continue
                conn = c.group("c").strip().lower()
                weak = c.group("weak") is not None or conn in ("as", "of", "to", "'s", "’s")
                if kind == "pass" and (weak or conn not in (":", "=", ":=")) and \
                        not (_TECH_PASS.search(text[max(0, m.start() - 20):m.start()]) and not weak):
                    continue
                if kind == "combination" and weak:
                    continue
                v = _VALUE.match(text, c.end())
                if not v:
                    continue
                value, quoted = _clean(v)
                if _UNIT_AFTER.match(text[v.end():]) and not quoted:
                    continue
                strength = "weak" if weak else "strong"
                if conn in (":", "=", ":="):
                    strength = "colon" if kind == "pass" else strength
                elif conn == "to" and re.search(r"\b(?:set|sets|setting|change[sd]?|changing|reset|resets|update[sd]?|"
                                                r"updating|switche[sd]|switch)\b[^.!?\n]{0,40}$",
                                                text[max(0, m.start() - 50):m.start()], re.IGNORECASE):
                    strength = "strong"  # "changed their password to X"
                if _value_ok(kind, value, quoted, strength):
                    return True
                # "the wifi password sunflower is on the fridge": a plain word placed where a value goes
                if kind == "password" and weak and c.group("weak") and not quoted and _wordish(value) and \
                        value.lower() not in _COMPOUNDS and re.match(
                            r"\s+(?:is|was|are)\s+(?:written|stuck|taped|printed|kept|posted|pinned|noted|listed|"
                            r"scribbled|on|in|under|at|behind|inside|above|below|by|next|the\s+same)\b",
                            text[v.end():], re.IGNORECASE):
                    return True
    return False


# nouns that follow "password" in ordinary compounds: "the password manager is on my phone"
_COMPOUNDS = set("""manager managers policy policies reset resets field fields hint hints strength change changes
requirement requirements rule rules protection recovery prompt box vault app apps generator length expiry expiration
rotation entry screen page form hash file list book notebook sheet document doc spreadsheet store storage database
security complexity history reuse leak leaks breach dialog window pad button email emails link system settings
setting option feature update updates login lock sharing section check checker tool text note card number code
letter envelope reminder question questions issue issues problem problems thing stuff habit habits advice tips
tip training course audit sticky notes attempt attempts characters field mode menu request requests expires""".split())

_VERB_BEFORE_VALUE = r"(?:with|using|uses?|used|chose|chooses|choose|picked|picks|pick|set|sets|typed|types|type|" \
                     r"entered|enters|enter|gave|gives|put|puts|made|makes|registered|selected|selects|keeps|kept)"
_BEFORE = re.compile(
    rf"(?P<verb>\b{_VERB_BEFORE_VALUE}\s+)?(?P<val>\"[^\"\n]{{1,80}}\"|“[^”\n]{{1,80}}”|'[^'\n]{{1,80}}'|`[^`\n]+`|"
    rf"[^\s\"“”'`]+)\s+(?P<conn>is|was|=|are|as|for|into|in)\s+(?:(?:also|still|now|actually|always)\s+)?"
    rf"(?P<det>{_DET}{{1,2}})(?P<mid>(?:[\w-]+\s+){{0,3}}?)(?P<kw>{_ALL_KW})(?P<after>[^\w/-]|$)",
    re.IGNORECASE)


def _stated_before(text: str) -> bool:
    """<value> <is|as|for|into> <my|the|their> ... <credential word>: "Tulip42 is my wifi password",
    "logs in with hunter2 as their password", "chose 4711 as their PIN", "typed X into the password field"."""
    for m in _BEFORE.finditer(text):
        det = m.group("det").strip().lower()
        if det.split()[0] in ("a", "an") or _GENERIC_WORDS.search(m.group("mid") + " " + m.group("det")):
            continue
        kind = next(k for k, rx in _KW.items() if k != "bare" and rx.fullmatch(m.group("kw")))
        after = text[m.end("kw"):m.end("kw") + 20]
        conn = m.group("conn").lower()
        if conn in ("into", "in"):  # "typed X into the password field"
            if not re.match(r"\s+(?:field|box|prompt|form|dialog|screen|pad|input|bar)\b", after, re.IGNORECASE):
                continue
        elif not re.match(r"\s*(?:$|[.,;:!?)\]\"'’”—–-]|\s(?:for|to|of|on|at|and|but|so|because|since|when|while|"
                          r"which|that|too|again|instead|now|then|here|there|every|each|(?:in|at|on)\s)|\s*\()",
                          after, re.IGNORECASE):
            continue  # the credential word is not the head noun: "4711 is the PIN pad's model"
        raw = m.group("val")
        quoted = raw[0] in "\"“'`" and len(raw) > 2
        value = raw[1:-1] if quoted else raw.rstrip(_TRAIL).lstrip("([")
        if kind in ("password", "pass") and not quoted and not (_strong(value) or _numeric(value, 4, 40)):
            # a plain word as the value needs a verb that hands it over: "logs in with sunflower as ..."
            if not (m.group("verb") and conn in ("as", "for") and _wordish(value)):
                continue
            if kind == "pass":
                continue
            return True
        strength = "strong" if quoted else "before"
        if kind == "pass":
            kind = "password"
        if _value_ok(kind, value, quoted, strength):
            return True
    return False


_ANSWER = re.compile(
    rf"(?<![\w/-])(?P<kw>{_ALL_KW})(?![\w/-])[^.!?\n]{{0,80}}?\b(?:answered|answers|replied|replies|responded|responds|"
    rf"said|says|wrote|writes|typed|types|texted|texts|entered|enters|gave|gives|told\s+\w+|sent|sends|"
    rf"recited|read\s+out)\b\s*(?:back\s+)?(?:with\s+|that\s+(?:it\s+)?(?:is|was)\s+|it\s+(?:is|was)\s+|it\s+as\s+)?"
    rf"[:,]?\s*", re.IGNORECASE)


def _stated_as_answer(text: str) -> bool:
    """'Asked what their PIN is, the user answered "4711"', "asked for the wifi password, they said X"."""
    for m in _ANSWER.finditer(text):
        v = _VALUE.match(text, m.end())
        if not v:
            continue
        kind = next(k for k, rx in _KW.items() if k != "bare" and rx.fullmatch(m.group("kw")))
        value, quoted = _clean(v)
        if kind == "pass":
            kind = "password"
        if not quoted and _UNIT_AFTER.match(text[v.end():]):
            continue
        if (quoted and len(value) >= 3) or _value_ok(kind, value, False, "weak"):
            return True
    return False


_PAIR = r"(?P<user>[^\s/|\"']{2,64})\s*[/|]\s*(?P<pw>\"[^\"\n]{1,80}\"|'[^'\n]{1,80}'|[^\s/|]{2,80})"
_PAIR_COLON = r"(?P<user>[^\s/|:\"']{2,64})\s*[/|:]\s*(?P<pw>\"[^\"\n]{1,80}\"|'[^'\n]{1,80}'|[^\s/|]{2,80})"
_LOGIN_STATED = re.compile(
    r"(?<![\w-])(?:logins?|log-?ins?|logons?|sign-?ins?|credentials|creds|login\s+(?:details|info|data)|"
    r"user(?:name)?\s*/\s*pass(?:word)?|u/p|user\s*&\s*pass(?:word)?|user(?:name)?\s+and\s+password)(?![\w-])"
    + _QUAL + r"\s*(?:(?:is|are|was|were|:|=|-|–)\s*)?(?:(?:still|now)\s+)?" + _PAIR_COLON, re.IGNORECASE)
_LOGIN_VERB = re.compile(
    r"\b(?:log(?:s|ged|ging)?\s*(?:in|on)(?:to)?|sign(?:s|ed|ing)?\s*(?:in|on)(?:to)?|authenticat\w*|connect(?:s|ed)?)\b"
    r"(?:\s+(?:to|into|at|on)\s+(?:[\w.@'’-]+\s+){0,3}?)?\s*(?P<how>with|using|as|via)\s+(?:the\s+)?" + _PAIR,
    re.IGNORECASE)
_USER_THEN_PASSWORD = re.compile(
    r"\b(?:user[ -]?name|user[ -]?id|login|user\s*[:=])\s*(?:is|:|=)?\s*(?P<user>[A-Za-z0-9][^\s,;'’]{1,63})[,;]?\s+"
    r"(?:and\s+|with\s+)?(?:(?:the|their|his|her|my)\s+)?(?:pass(?:word)?|pw|pwd|passcode|pin)\b"
    r"(?P<conn>\s*(?:is|:|=)\s*|\s+)", re.IGNORECASE)
_AUTH_WORDS = set("""password passwords pass pw pwd pin passcode passkey email e-mail mail google apple facebook
microsoft github sso oauth saml fingerprint face faceid touch touchid sms phone code otp 2fa mfa username user name
biometrics authenticator app key token yubikey card""".split())


def _login_pair(text: str) -> bool:
    """A username with its password: "login: alice / Tulip42", "user/pass admin/admin", "logs in as
    admin/admin", "username bob, password sunflower"."""
    for m in _LOGIN_STATED.finditer(text):
        pw = m.group("pw").strip("\"'").rstrip(_TRAIL)
        if pw.lower() not in _AUTH_WORDS and (len(pw) >= 2 and (_wordish(pw) or _strong(pw) or _numeric(pw, 3, 40))):
            return True
    for m in _LOGIN_VERB.finditer(text):
        user, pw = m.group("user"), m.group("pw").strip("\"'").rstrip(_TRAIL)
        if pw.lower() in _AUTH_WORDS or user.lower() in _AUTH_WORDS:
            continue
        if _strong(pw) or _numeric(pw, 4, 40) or (m.group("how").lower() == "as" and _wordish(pw)) or \
                pw.lower() == user.lower():
            return True
    for m in _USER_THEN_PASSWORD.finditer(text):
        if m.group("user").lower() in _STOP or m.group("user").lower() in _AUTH_WORDS:
            continue
        v = _VALUE.match(text, m.end())
        if v:
            value, quoted = _clean(v)
            if quoted or _strong(value) or _numeric(value, 3, 40) or _wordish(value):
                return True
    return False


# a password made from the word itself: "Password123!", "P@ssw0rd", "pass1234" (not "1Password")
_PASSWORD_WORD_VALUE = re.compile(r"(?<![\w@$])(?:p[a@4][s$5][s$5]w[o0]rd|p[a@4][s$5][s$5])(?:[0-9!@#$%^&*?]+)(?![\w])|"
                                  r"(?<![\w@$])p(?:@[s$5][s$5]w[o0]rd|[a4][s$5][s$5]w0rd|[a4]\$\$w[o0]rd)(?![\w])",
                                  re.IGNORECASE)


def stated_credentials(text: str) -> bool:
    """Whether ``text`` states a credential in words (a password, PIN, door code, API key, seed
    phrase or login), in the first or third person."""
    return _stated_after(text) or _stated_before(text) or _stated_as_answer(text) or _login_pair(text) or \
        bool(_PASSWORD_WORD_VALUE.search(text))


# ------------------------------------------------------------------ token formats
# the baseline's hand-written patterns
_REGEX = {
    "AWS Access Key": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "GitHub Token": re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}\b|\bgithub_pat_[A-Za-z0-9_]{22,}\b"),
    "API Key": re.compile(r"\b(?:sk|pk|rk)-(?:[A-Za-z0-9_-]{20,})\b|\bxox[abpors]-[A-Za-z0-9-]{10,}\b"),
    "Private Key": re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----"),
    "Card Number": re.compile(r"\b(?:\d[ -]?){12,18}\d\b"),
    "IBAN": re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,3})?\b"),
}

# card numbers as written: 13-19 digits in one run, or grouped 4-4-4-x or 4-6-5 (Amex)
_CARD_CANDIDATE = re.compile(r"(?<![\w-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -])\d{6}\2\d{5})"
                             r"(?![ -]?\d)")
# IBANs as written: compact, or in groups of four
_IBAN_CANDIDATE = re.compile(r"\b[A-Z]{2}\d{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,3})?)\b")
# provider key formats detect-secrets 1.5 lacks or matches too narrowly (its OpenAI rule wants the
# legacy "T3BlbkFJ" marker, its Stripe rule only sk_live_/rk_live_, its npm rule the old format)
_TOKEN_CHARS = r"[A-Za-z0-9_-]"
_PROVIDER = {
    "OpenAI Token": re.compile(r"(?<![\w-])sk-(?:proj-|svcacct-|admin-|None-)?(?=[A-Za-z0-9_-]*\d)[A-Za-z0-9_-]{20,}"),
    "Anthropic Token": re.compile(r"(?<![\w-])sk-ant-[a-z]{3}\d{2}-[A-Za-z0-9_-]{20,}"),
    "Stripe Access Key": re.compile(r"(?<![\w-])(?:sk|rk|pk)[_-](?:live|test)[_-][0-9A-Za-z]{10,}|"
                                    r"(?<![\w-])whsec_[A-Za-z0-9]{20,}"),
    "Google API Key": re.compile(r"(?<![\w-])AIza[0-9A-Za-z_-]{30,}|(?<![\w-])ya29\.[0-9A-Za-z_-]{20,}|"
                                 r"(?<![\w-])GOCSPX-[0-9A-Za-z_-]{20,}"),
    "Hugging Face Token": re.compile(r"(?<![\w-])(?:hf|api_org)_[A-Za-z0-9]{30,}"),
    "NPM tokens": re.compile(r"(?<![\w-])npm_[A-Za-z0-9]{30,}"),
    "GitHub Token": re.compile(r"(?<![\w-])(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,})"),
    "Twilio API Key": re.compile(r"(?<![\w-])(?:SK|AC)[0-9a-fA-F]{32}(?![\w-])"),
    "SendGrid API Key": re.compile(r"(?<![\w-])SG\.[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{20,}"),
    "Slack Token": re.compile(r"(?<![\w-])xox[abposre]-[A-Za-z0-9-]{10,}|(?<![\w-])xapp-\d-[A-Za-z0-9-]{10,}"),
    "JSON Web Token": re.compile(r"(?<![\w-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    "AWS Access Key": re.compile(r"(?<![\w-])(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}(?![\w-])"),
    # other providers' prefixed tokens: GitLab, DigitalOcean, Shopify, Square, PyPI, Notion, Linear,
    # Groq, Replicate, Perplexity, xAI, Databricks, Mailgun, Doppler, Postman, Atlassian, Dropbox, ...
    "Provider Token": re.compile(
        r"(?<![\w-])(?:glpat-|gldt-|glrt-|glptt-|dop_v1_|doo_v1_|dor_v1_|shpat_|shpss_|shpca_|shppa_|sq0atp-|sq0csp-|"
        r"EAAA|pypi-|ntn_|lin_api_|gsk_|r8_|pplx-|xai-|dp\.st\.|dp\.pt\.|PMAK-|ATATT|sl\.|rzp_live_|rzp_test_|"
        r"FLWSECK-|FLWSECK_TEST-)(?=[A-Za-z0-9_.-]*\d)(?=[A-Za-z0-9_.-]*[A-Za-z])[A-Za-z0-9_.-]{16,}|"
        # generic prefixes ("key-", "secret_", "api_") only before one unbroken run of a key alphabet
        r"(?<![\w-])(?:secret_|dapi|key-|sk_|pat_|tok_|tkn_|api_|apikey_|token_|access_|auth_)"
        r"(?=[A-Za-z0-9]*\d)(?=[A-Za-z0-9]*[A-Za-z])[A-Za-z0-9]{20,}(?![\w-])"),
    "Private Key": re.compile(r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|PuTTY-User-Key-File-\d"),
    "Basic Auth Credentials": re.compile(r"\b[a-z][a-z0-9+.-]{1,15}://[^\s:/@]{1,64}:[^\s@/]{1,128}@[\w.-]+"),
}
# an unprefixed key pasted alone: 32+ characters of a key alphabet mixing upper, lower and digits
_HIGH_ENTROPY = re.compile(r"(?<![\w/+=.-])[A-Za-z0-9_+/-]{32,}={0,2}(?![\w/+=-])")
_NOT_SECRETS = {"Public IP (ipv4)"}  # an address, not a credential


def _high_entropy(text: str) -> bool:
    for m in _HIGH_ENTROPY.finditer(text):
        t = m.group()
        if sum(c.isupper() for c in t) >= 3 and sum(c.islower() for c in t) >= 3 and _digits(t) >= 3 and \
                len(set(t)) >= 16 and t.count("/") <= len(t) // 16:
            return True
    return False


def _detect_secrets_plugins() -> list:
    """detect-secrets' regex-based plugins (no entropy or keyword heuristics: those are made
    for source code and fire on ordinary words)."""
    import detect_secrets.plugins as pkg
    import importlib
    import inspect
    import pkgutil

    from detect_secrets.plugins.base import RegexBasedDetector

    plugins = []
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, RegexBasedDetector) and cls is not RegexBasedDetector and \
                    cls.__module__ == module.__name__ and getattr(cls, "secret_type", None) and \
                    cls.secret_type not in _NOT_SECRETS:
                plugins.append(cls())
    return plugins


class SecretFilter:
    def __init__(self, detector: str = "library"):
        if detector not in DETECTORS:
            raise ValueError(f"secret_filter: expected one of {', '.join(DETECTORS)}, got {detector!r}")
        self.detector = detector
        self._plugins = None
        if detector == "library":
            try:
                self._plugins = _detect_secrets_plugins()
                from stdnum import ean, iban, luhn  # noqa: F401
            except ImportError as exc:
                raise ValueError(f"secret_filter library needs detect-secrets and python-stdnum "
                                 f"(pip install -r requirements.txt): {exc}") from None

    def find(self, text: str) -> List[str]:
        """The secret types in ``text`` (sorted, unique); empty when clean or when off."""
        if self.detector == "off" or not text:
            return []
        found = set()
        if self.detector == "regex":
            if _STATED.search(text):
                found.add("Stated Credential")
            found.update(name for name, rx in _REGEX.items() if rx.search(text))
            return sorted(found)
        if stated_credentials(text):
            found.add("Stated Credential")
        for plugin in self._plugins:
            if any(True for _ in plugin.analyze_string(text)):
                found.add(plugin.secret_type)
        found.update(name for name, rx in _PROVIDER.items() if rx.search(text))
        if not found and _high_entropy(text):  # a fallback: only when no named format matched
            found.add("High Entropy Token")
        from stdnum import ean, iban, luhn

        for m in _CARD_CANDIDATE.finditer(text):
            digits = re.sub(r"\D", "", m.group())
            if 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn.is_valid(digits) and \
                    not (len(digits) == 13 and m.group() == digits and ean.is_valid(digits)):  # an EAN-13 barcode
                found.add("Card Number")
        for m in _IBAN_CANDIDATE.finditer(text):
            # mod 97 and the country's BBAN layout; not the national check digits, which some
            # valid-looking test IBANs fail and which add little over mod 97
            try:
                iban.validate(m.group(), check_country=False)
                found.add("IBAN")
            except Exception:
                pass
        return sorted(found)

    def keep(self, text: str, counts: Optional[Counter] = None) -> bool:
        """False when ``text`` holds a secret; its types are added to ``counts``."""
        types = self.find(text)
        if types and counts is not None:
            counts.update(types)
        return not types


def secret_filter_for(option: str) -> Optional[SecretFilter]:
    """The filter of a ``--secret_filter`` value; None when it is ``off``."""
    return None if option == "off" else SecretFilter(option)


def log_filtered(counts: Dict[str, int], what: str) -> None:
    """Filtered items are logged by type and count, never by value."""
    if counts:
        logger.warning("secret filter: dropped %s containing %s", what,
                       ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))


def filter_texts(texts: Iterable[str], secret_filter: Optional[SecretFilter], what: str) -> List[bool]:
    """A keep-mask over ``texts``, logging what was dropped by type."""
    texts = list(texts)
    if secret_filter is None:
        return [True] * len(texts)
    counts: Counter = Counter()
    mask = [secret_filter.keep(t, counts) for t in texts]
    log_filtered(counts, what)
    return mask
