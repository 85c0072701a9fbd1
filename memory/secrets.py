"""Keep secrets out of memories and training data.

A memory is trained into weights that cannot be edited line by line, so a password, API key,
card number, IBAN or private key must never become one, nor a cue or an SFT example.
``SecretFilter.find(text)`` returns the *types* found (never the values); callers drop the
item and log the types.

Detectors (``--secret_filter``):

- ``library`` (default): the maintained detectors where PyPI has them: detect-secrets' pattern
  plugins (cloud, VCS, chat and payment-provider tokens, private keys, JWTs, basic-auth URLs),
  and python-stdnum's checksums for card numbers (Luhn) and IBANs (mod 97), plus our rule for
  credentials stated in words ("my password is ...").
- ``regex``: hand-written patterns only (no checksums), the baseline the benchmark compares to
  (``python -m bench.secrets_filter``).
- ``off``.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Dict, Iterable, List, Optional

logger = logging.getLogger(__name__)

DETECTORS = ("library", "regex", "off")

# credentials stated in words: "my password is X", "PIN: 1234", "the wifi passphrase = X"
_STATED = re.compile(
    r"\b(?:password|passwd|passcode|passphrase|pass\s*word|pin(?:\s*code)?|api[\s_-]?key|access[\s_-]?key|"
    r"secret[\s_-]?key|auth(?:entication)?[\s_-]?token|access[\s_-]?token|token|private[\s_-]?key|"
    r"security\s+code|cvv|cvc)\b"
    r"(?:\s+(?:for|to|of|on|at)(?:\s+[\w.-]+){1,3}?)?"
    r"\s*(?:is|was|=|:|are)\s*[\"'`]?(?!(?:a|an|the|not|too|very|so|really|my|your|strong|weak|long|short|"
    r"secret|private|safe|same|different|new|old|required|expired|reset|changed|set)\b)([^\s\"'`]{3,})",
    re.IGNORECASE)

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
# gaps in detect-secrets 1.5's plugins, found by the labelled set: OpenAI project keys, npm tokens
_SUPPLEMENT = {"OpenAI Token": re.compile(r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{32,}\b"),
               "NPM tokens": re.compile(r"\bnpm_[A-Za-z0-9]{36}\b")}
_NOT_SECRETS = {"Public IP (ipv4)"}  # an address, not a credential


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
                from stdnum import iban, luhn  # noqa: F401
            except ImportError as exc:
                raise ValueError(f"secret_filter library needs detect-secrets and python-stdnum "
                                 f"(pip install -r requirements.txt): {exc}") from None

    def find(self, text: str) -> List[str]:
        """The secret types in ``text`` (sorted, unique); empty when clean or when off."""
        if self.detector == "off" or not text:
            return []
        found = set()
        if _STATED.search(text):
            found.add("Stated Credential")
        if self.detector == "regex":
            found.update(name for name, rx in _REGEX.items() if rx.search(text))
            return sorted(found)
        for plugin in self._plugins:
            if any(True for _ in plugin.analyze_string(text)):
                found.add(plugin.secret_type)
        found.update(name for name, rx in _SUPPLEMENT.items() if rx.search(text))
        from stdnum import iban, luhn

        for m in _CARD_CANDIDATE.finditer(text):
            digits = re.sub(r"\D", "", m.group())
            if 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn.is_valid(digits):
                found.add("Card Number")
        for m in _IBAN_CANDIDATE.finditer(text):
            if iban.is_valid(m.group()):
                found.add("IBAN")
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
