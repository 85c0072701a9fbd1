"""Secret filter: the default detector (``library``) vs the hand-written baseline (``regex``).

    python -m bench.secrets_filter [--seed 0]

Three labelled sets, both detectors scored in the same run:

- ``templated``: generated here from templates (seeded): secrets of each kind (passwords of
  several shapes, PINs and door/alarm/safe codes, CVVs, "user / pass" logins, API keys of common
  providers in their formats, JWTs, cards, IBANs, private-key headers, seed phrases) stated in
  many phrasings, first person (raw chat: "my pw: ...") and third person (memories: "The user's
  wifi password is ..."), and negatives that must survive: ordinary facts with numbers, dates,
  prices, flat numbers, phone-like strings, postcodes, order/flight/version numbers, scores,
  card-shaped numbers failing Luhn, and the credential words in ordinary use ("forgot their
  password", "the PIN pad was broken", "a bus pass", "a token of thanks", "the key is under the
  mat"). The rules in ``memory.secrets`` were written alongside these templates, so the
  ``library`` figure on it is a tuning figure; run with another ``--seed`` for fresh values.
- ``labelled (tuning)`` (``bench/data/secrets_labelled.jsonl``, 80 sentences) and ``held-out``
  (``bench/data/secrets_heldout.jsonl``, 40 sentences, written before the first detectors were
  run; its misses were fixed since, so it is no longer held out for ``library``).

Decisions on what counts (see ``memory.secrets``): Stripe publishable keys (``pk_live_``) are
dropped as secrets; a physical key, a bus pass, a password *policy* are not secrets; usernames
alone are not secrets, a username with its password is.
"""
from __future__ import annotations

import argparse
import base64
import json
import random
import string
import time
from pathlib import Path

from memory.secrets import SecretFilter

SETS = {"labelled (tuning)": Path("bench/data/secrets_labelled.jsonl"),
        "held-out": Path("bench/data/secrets_heldout.jsonl")}

# ------------------------------------------------------------------ values
WORDS = ["tulip", "sunflower", "otter", "ladder", "window", "falcon", "maple", "river", "copper", "velvet", "harbor",
         "pepper", "zebra", "orchid", "canyon", "meadow", "pixel", "rocket", "walnut", "ember", "glacier", "lantern"]
SERVICES = ["wifi", "email", "Gmail", "Netflix", "bank", "router", "work laptop", "PayPal", "Amazon", "iCloud",
            "VPN", "Spotify", "home Wi-Fi", "Outlook", "Steam", "school portal", "NAS", "database"]
USERS = ["alice", "bob.smith", "admin", "jdoe@example.com", "mkeller", "root", "sam_92", "lena.h@mail.de", "tom"]
PROVIDERS = ["OpenAI", "Stripe", "AWS", "GitHub", "Slack", "Google", "Twilio", "SendGrid", "npm", "Hugging Face"]
FIRST = [("The user's", "their"), ("My", "my"), ("Her", "her"), ("His", "his"), ("Our", "our")]


def _rand(rng, alphabet, n):
    return "".join(rng.choice(alphabet) for _ in range(n))


def password(rng, plain=True):
    """Passwords of varied shapes; a plain lowercase word only when ``plain``."""
    shapes = [lambda: rng.choice(WORDS).capitalize() + str(rng.randint(1, 9999)),
              lambda: rng.choice(WORDS).capitalize() + rng.choice("!@#$%&*?") + str(rng.randint(1990, 2030)),
              lambda: "".join(rng.choice([c, {"o": "0", "a": "4", "e": "3", "i": "1", "s": "5"}.get(c, c)])
                              for c in rng.choice(WORDS)) + rng.choice("&!#") + str(rng.randint(1, 99)),
              lambda: _rand(rng, string.ascii_letters + string.digits + "!#$%&*", rng.randint(8, 14)),
              lambda: "-".join(rng.sample(WORDS, rng.randint(3, 4))),
              lambda: rng.choice(WORDS) + str(rng.randint(10, 99)),
              lambda: str(rng.randint(10 ** 5, 10 ** 9))]
    if plain:
        shapes.append(lambda: rng.choice(WORDS))
    v = rng.choice(shapes)()
    if not any(c.isdigit() or not c.isalpha() for c in v) and not plain:
        v += str(rng.randint(1, 99))
    return v


def pin(rng):
    return str(rng.randint(0, 10 ** rng.randint(4, 8) - 1)).zfill(rng.randint(4, 8))


def luhn_complete(prefix, length, rng):
    digits = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    for check in string.digits:
        n = digits + check
        total = sum(int(d) if i % 2 == 0 else (2 * int(d) - 9 if int(d) > 4 else 2 * int(d))
                    for i, d in enumerate(reversed(n)))
        if total % 10 == 0:
            return n


def luhn_invalid(prefix, length, rng):
    n = luhn_complete(prefix, length, rng)
    return n[:-1] + str((int(n[-1]) + rng.randint(1, 9)) % 10)


def card(rng):
    prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("6011", 16), ("34", 15),
                                 ("37", 15), ("4", 13)])
    n = luhn_complete(prefix, length, rng)
    style = rng.choice(["plain", "space", "dash"])
    if style == "plain" or length == 13:
        return n
    sep = " " if style == "space" else "-"
    if length == 15:
        return sep.join([n[:4], n[4:10], n[10:]])
    return sep.join(n[i:i + 4] for i in range(0, 16, 4))


def iban(rng):
    country, bban = rng.choice([("DE", lambda: _rand(rng, string.digits, 18)),
                                ("GB", lambda: rng.choice(["WEST", "NWBK", "BARC"]) + _rand(rng, string.digits, 14)),
                                ("NL", lambda: rng.choice(["ABNA", "INGB", "RABO"]) + _rand(rng, string.digits, 10)),
                                ("FR", lambda: _rand(rng, string.digits, 23)),
                                ("ES", lambda: _rand(rng, string.digits, 20)),
                                ("CH", lambda: _rand(rng, string.digits, 17))])
    b = bban()
    numeric = "".join(str(int(c, 36)) for c in b + country + "00")
    n = f"{country}{98 - int(numeric) % 97:02d}{b}"
    return n if rng.random() < 0.5 else " ".join(n[i:i + 4] for i in range(0, len(n), 4))


def api_key(rng, provider=None):
    an = string.ascii_letters + string.digits
    keys = {
        "OpenAI": lambda: rng.choice(["sk-", "sk-proj-", "sk-svcacct-"]) + _rand(rng, an + "_-", 48),
        "Anthropic": lambda: "sk-ant-api03-" + _rand(rng, an + "_-", 80),
        "Stripe": lambda: rng.choice(["sk_live_", "sk-live-", "rk_live_", "pk_live_", "sk_test_", "rk_test_"])
        + _rand(rng, an, rng.choice([24, 32, 99])),
        "AWS": lambda: rng.choice(["AKIA", "ASIA"]) + _rand(rng, string.ascii_uppercase + string.digits, 16),
        "GitHub": lambda: rng.choice([rng.choice(["ghp_", "gho_", "ghs_", "ghu_"]) + _rand(rng, an, 36),
                                      "github_pat_" + _rand(rng, an, 22) + "_" + _rand(rng, an, 59)]),
        "Slack": lambda: rng.choice(["xoxb-", "xoxp-"]) + "-".join(_rand(rng, string.digits, 12) for _ in range(2))
        + "-" + _rand(rng, an, 24),
        "Google": lambda: "AIza" + _rand(rng, an + "_-", 35),
        "Twilio": lambda: "SK" + _rand(rng, "0123456789abcdef", 32),
        "SendGrid": lambda: "SG." + _rand(rng, an + "_-", 22) + "." + _rand(rng, an + "_-", 43),
        "npm": lambda: "npm_" + _rand(rng, an, 36),
        "Hugging Face": lambda: "hf_" + _rand(rng, an, 34),
        "GitLab": lambda: "glpat-" + _rand(rng, an + "_-", 20),
        "JWT": lambda: ".".join(base64.urlsafe_b64encode(json.dumps(p).encode()).decode().rstrip("=") for p in (
            {"alg": "HS256", "typ": "JWT"}, {"sub": str(rng.randint(1, 10 ** 9)), "name": rng.choice(WORDS)}))
        + "." + _rand(rng, an + "_-", 43),
    }
    name = provider or rng.choice(list(keys))
    return name, keys[name]()


PRIVATE_KEYS = ["-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA{r}", "-----BEGIN OPENSSH PRIVATE KEY-----",
                "-----BEGIN EC PRIVATE KEY----- MHcCAQEEI{r}", "-----BEGIN PRIVATE KEY-----",
                "-----BEGIN ENCRYPTED PRIVATE KEY-----", "-----BEGIN PGP PRIVATE KEY BLOCK-----",
                "-----BEGIN DSA PRIVATE KEY-----"]

# ------------------------------------------------------------------ templates
# {o} owner ("The user's"/"My"), {p} possessive ("their"/"my"), {s} service, {v} value, {u} username
PASSWORD_ANY = [  # stated plainly: any password shape, a plain word included
    "{o} {s} password is {v}.", "{o} password for {s} is {v}.", "{o} {s} password = {v}", "{S} password: {v}",
    "{o} {s} passphrase is {v}.", "{o} {s} passcode is {v}.", "pw: {v}", "{p} pw is {v}", "{o} {s} pwd: {v}",
    "passwd={v}", "The user set {p} {s} password to {v}.", "I changed my {s} password to {v} yesterday.",
    "{o} {s} password was {v} until last year.", "{S} admin pass: {v}", "username: {u} password: {v}",
    "{o} {s} login is {u} and the password is {v}.", "The password to {p} {s} is {v}.",
    "{o} {s} password is now {v}.", "PASSWORD: {v}", "{o} {s} password, which is {v}, never changes.",
    "{o} {s} password is: {v}", "Password for {s} - {v}", "username {u}, password {v}",
    "The user's password has been changed to {v}.", "{o} {s} password is \"{v}\".", "my {s} p/w is {v}",
]
PASSWORD_SHAPED = [  # the value in other positions: passwords with digits or symbols
    "the {s} password {v} is on the fridge", "{o} {s} password, {v}, is written on a sticky note.",
    "{v} is my {s} password", "{v} is the user's {s} password.", "The user logs in with {v} as their password.",
    "I use {v} as my {s} password", "The user chose {v} for their {s} password.",
    "Asked for the {s} password, the user said {v}.", "The user typed {v} into the password field.",
    "The user uses the password {v} for {s}.", "{o} {s} password ({v}) has not changed in years.",
    "When asked for their password the user replied \"{v}\".", "{v} is {p} {s} password, don't share it",
    "The user reuses {v} as the password everywhere.", "the {s} pw {v} works", "The user picked {v} as their password.",
    "The user's {s} password? It's {v}.", "{v} = my {s} password",
]
PIN_TEMPLATES = [
    "{o} PIN is {n}.", "{o} bank PIN is {n}", "{o} debit card PIN: {n}", "PIN code {n}", "the SIM pin = {n}",
    "{o} phone passcode is {n}.", "Asked what {p} PIN is, the user answered \"{n}\".", "{n} is my PIN",
    "The user uses {n} as their PIN.", "The door code is {n}.", "The code for the front door is {n}.",
    "The alarm code at the user's house is {n}.", "The gate code: {n}", "my garage code is {n}",
    "The user set the PIN to {n}.", "The PIN for the user's debit card is {n}.", "The verification code is {n}.",
    "{o} phone unlock code is {n}.", "The keypad code {n} opens the office.", "{o} PIN number is {n}",
    "The code to the safe is {n}.", "{o} ATM pin - {n}", "the building entry code is {n}",
    "When asked for the PIN, the user typed {n}.", "The user's card PIN, {n}, is on a note in the wallet.",
    "{o} SIM card PIN is still {n}.", "The user's 2FA code was {n}.", "{o} pincode: {n}",
]
COMBO_TEMPLATES = ["{o} safe combination is {c}.", "The combination to the locker is {c}.",
                   "{o} bike lock combination is {c}", "The padlock combination: {c}"]
CVV_TEMPLATES = ["{o} card's CVV is {n3}.", "cvv {n3}", "The security code on the card is {n3}.", "CVC: {n3}"]
LOGIN_TEMPLATES = [
    "login: {u} / {v}", "{o} {s} login is {u}/{v}.", "user/pass: {u}/{v}", "The user's credentials are {u} / {v}.",
    "The user logs in as {u}/{v}.", "I sign in to the {s} with {u} / {v}", "{o} username is {u} and password {v}.",
    "creds for the {s}: {u}:{v}", "{S} login details are {u} / {v}", "u/p {u}/{v}",
    "The user's {s} username is {u}, password {v}.", "Login for {s} = {u} | {v}",
]
LOGIN_PLAIN = ["{u}/{u}", "admin/admin", "{u}/{w}"]  # weak passwords in login pairs
KEY_TEMPLATES = [
    "{o} {P} key is {k}.", "my {P} api key: {k}", "{k}", "The user pasted {k} into the chat.",
    "export API_KEY={k}", "Use {k} for the {P} account.", "{o} token is {k}", "here's the key {k} for prod",
    "The user's {P} secret key = {k}", "{P} token {k}", "The user keeps {k} in a text file.",
    "Bearer {k}", "I put {k} in the config", "The deploy script uses {k}.",
]
CARD_TEMPLATES = ["{o} card number is {c}.", "my visa {c} exp 05/29", "The user paid with card {c}.", "{c}",
                  "Card: {c}", "The user's credit card, {c}, was declined."]
IBAN_TEMPLATES = ["{o} IBAN is {i}.", "Pay into {i}", "IBAN: {i}", "The user's salary goes to {i}.",
                  "my account is {i}"]
KEY_HEADER_TEMPLATES = ["{h}", "I pasted {h} into the chat by mistake", "The user's server key starts {h}"]
PHRASE_TEMPLATES = ["{o} seed phrase is {ph}.", "my recovery phrase: {ph}", "{o} wallet seed phrase is \"{ph}\""]

NEGATIVES = [
    "The user lives at flat {n2}, {w} Street {n3}.", "My flat is number {n2}.", "The user's house number is {n3}.",
    "The user's phone number is {phone}.", "Call me on {phone}", "The user's order number is #{d6}.",
    "My order {d8} arrived on {date}.", "The user's flight is {fl} on {date}.", "The user was born on {date}.",
    "The user paid ${price} for the {w} lamp.", "I spent €{price} on groceries", "The user's postcode is {pc}.",
    "My zip code is {zip}.", "The user runs version {ver} of the app.", "The user's team won {a}-{b} on Sunday.",
    "The meeting is at {time}.", "The user's password policy changed in {year}.", "The user forgot their password again.",
    "The PIN pad at the shop was broken.", "The wifi is slow in the evenings.", "The user bought an iPhone {n2}.",
    "The user gave the teacher a token of thanks.", "The key is under the mat.", "The user's bus pass costs €{n2}.",
    "The user passed the exam with {n2}%.", "The user's password is {n2} characters long.", "The PIN is 4 digits long.",
    "The user's password manager is 1Password.", "The user's password expired on {date}.",
    "The user changed their PIN last week.", "The user's door number is {n3}.", "The user's locker number is {d4}.",
    "Ticket number {d8} is valid until {date}.", "The user's student ID is S{d7}.", "The area code is {n3}.",
    "The user's employee number is {d6}.", "Invoice INV-{year}-{d4} is due on {date}.",
    "Invoice {badcard} is overdue.", "The parcel id is {d22}.", "The user's favourite number is {n3}.",
    "The user ran {n2} km in {n2} minutes.", "The user's IBAN changed when they moved banks.",
    "The user's API design course starts on {date}.", "The user keeps a spare key under the mat.",
    "The user's secret ingredient is cinnamon.", "The user's PIN was reset at the branch on {date}.",
    "The user's gym pass is valid until {month}.", "The user got a boarding pass for gate {gate}.",
    "My ski pass cost €{price}.", "The password must be at least {n2} characters.", "The user uses a password manager.",
    "The user's Wi-Fi network is called {w}-{n2}G.", "The user's sort code is {sort}.", "The user's tax code is 1257L.",
    "The promo code is SAVE{n2}.", "The user's booking reference is {ref}.", "The user's blood pressure is 120/{n2}.",
    "The user's last commit was {hex40}.", "The user's order id is {uuid}.", "The user runs Python 3.{n2}.{n1}.",
    "The user's router is a TP-Link Archer C{n2}.", "The user's bike lock has a 4-digit code.",
    "The user's door code changed last month.", "The user's key card stopped working.",
    "The user's API key expires next month.", "The user's wifi password is shared with guests.",
    "The user's password was leaked in a breach in {year}.", "The user sets a new password every {n2} days.",
    "The user logs in with Google.", "The user signs in with email/password.", "The user logs in with Face ID.",
    "The user logs in at {time} every day.", "The user has {n2} tokens left at the arcade.",
    "The user passed {n1} exams this year.", "The user's username is {u}.", "My password reset link expired.",
    "I forgot my PIN again", "The user's car is a {year} {w2}.", "The user's ISBN collection includes {isbn}.",
    "The user's meeting id is {n3} {d4} {d4}.", "The user scored {d4} points in the game.",
    "The user's password is too short.", "The user's PIN is the same as their old one.",
    "The key to the user's success is {w}.", "The user's passport expires in {year}.", "The user lives at {n2}B {w} Road.",
    "The user's apartment is on floor {n2}, unit {n3}.", "The user takes the {n2} bus at {time}.",
    "The user weighs {n2} kg.", "The user's salary is ${d6} a year.", "The temperature was {n2}°C on {date}.",
    "The user's tracking number is 1Z{ups}.", "The user's office extension is {d4}.",
    "The user's server has {n2} GB of RAM.", "The user's security question is about their first pet.",
    "The user's password needs a symbol.", "The user's token of appreciation was a {w} plant.",
    "Their password is the name of their dog.", "The user enters their password twice a day.",
    "The user's login page moved to a new URL.", "The user logs in with work/personal accounts.",
    "The user's credentials are stored in a vault.", "The user changed the password to something stronger.",
    "The user's PIN code was sent by post.", "The user's alarm code has six digits.",
    "The combination of flavours is great.", "The user's account number ends in {d4}.",
    "The user rented locker {n3} for {n2} days.", "Room {n3} is booked for {date}.",
    "The user's vaccination was on {date}.", "The user's license plate is {plate}.",
    "The user's favourite film is Sneakers.", "The user likes the show Mr. Robot.", "The user paid 1,250.00 for the sofa.",
    "The user bought a {w2} model {ver}.", "The user got {a}/{b} on the quiz.", "The user was {n2} minutes late.",
    "The user's password is different for every site.", "The user's PIN pad beeps.", "The user wants a key lime pie.",
    "The bus pass is {price} euros a month.", "The user took a day pass for {price}.", "The user's hall pass expired.",
    "The user's 2FA uses an authenticator app.", "The user's API token limit is {d4} per day.",
    "The user's session lasted {n2} minutes.", "Call the office at {phone} before {time}.",
    "The user's house code for the tax office is {ref}.", "The user's Netflix plan costs ${price}.",
    "The user's wifi router sits on shelf {n1}.", "The user's seed catalog arrived.", "The user plays chess at {n3} elo.",
    "The user's bank branch number is {n3}.", "The user has {n2} passwords saved.",
]


def _ctx(rng):
    o, p = rng.choice(FIRST)
    s = rng.choice(SERVICES)
    date = rng.choice([f"{rng.randint(1, 28)}/{rng.randint(1, 12):02d}/{rng.randint(1950, 2030)}",
                       f"{rng.randint(1950, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                       f"{rng.randint(1, 28)} {rng.choice(['May', 'June', 'March'])} {rng.randint(1950, 2030)}"])
    phone = rng.choice([f"+44 7700 900{rng.randint(0, 999):03d}", f"({rng.randint(200, 999)}) 555-{rng.randint(0, 9999):04d}",
                        f"0171 234 {rng.randint(0, 9999):04d}", f"+49 30 {rng.randint(10 ** 7, 10 ** 8 - 1)}",
                        f"555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}", f"+1 212 555 {rng.randint(1000, 9999)}",
                        f"0{rng.randint(10 ** 9, 10 ** 10 - 1)}"])
    d = lambda k: str(rng.randint(10 ** (k - 1), 10 ** k - 1))  # noqa: E731
    return dict(o=o, p=p, s=s, S=s[0].upper() + s[1:], u=rng.choice(USERS), w=rng.choice(WORDS).capitalize(),
                w2=rng.choice(["Golf", "Corolla", "Civic", "Model 3"]), n1=rng.randint(1, 9), n2=rng.randint(2, 99),
                n3=rng.randint(100, 999), d4=d(4), d6=d(6), d7=d(7), d8=d(8), d22=d(22), date=date, phone=phone,
                price=f"{rng.randint(1, 999)}.{rng.randint(0, 99):02d}", fl=rng.choice(["LH", "BA", "UA", "AF"]) + d(4),
                pc=rng.choice(["SW1A 1AA", "EC1V 9HX", "10115", "75008", "M1 1AE"]), zip=d(5),
                ver=f"{rng.randint(1, 20)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}", a=rng.randint(0, 9),
                b=rng.randint(0, 9), time=rng.choice([f"{rng.randint(1, 12)}pm", f"{rng.randint(0, 23)}:{rng.randint(0, 59):02d}",
                                                      f"{rng.randint(1, 12)}:30 am"]),
                year=rng.randint(1990, 2030), month=rng.choice(["March", "June", "December"]),
                gate=rng.choice("ABCD") + str(rng.randint(1, 60)), sort=f"{d(2)}-{d(2)}-{d(2)}",
                ref=_rand(rng, string.ascii_uppercase, 3) + d(3), hex40=_rand(rng, "0123456789abcdef", 40),
                uuid="-".join(_rand(rng, "0123456789abcdef", k) for k in (8, 4, 4, 4, 12)),
                badcard=luhn_invalid(rng.choice(["4", "51", "6011"]), 16, rng),
                isbn="978" + d(10), plate=f"{_rand(rng, string.ascii_uppercase, 2)}{d(2)} {_rand(rng, string.ascii_uppercase, 3)}",
                ups=_rand(rng, string.ascii_uppercase + string.digits, 16))


def templated(seed: int = 0):
    """Labelled rows {text, secret, kind}: every template at least once, with fresh values."""
    rng = random.Random(seed)
    rows = []

    def add(kind, templates, make, reps=1):
        for t in templates:
            for _ in range(reps):
                c = _ctx(rng)
                c.update(make(c))
                rows.append({"text": t.format(**c), "secret": kind is not None, "kind": kind})

    add("password", PASSWORD_ANY, lambda c: {"v": password(rng)}, 3)
    add("password", PASSWORD_SHAPED, lambda c: {"v": password(rng, plain=False)}, 3)
    add("pin", PIN_TEMPLATES, lambda c: {"n": pin(rng)}, 2)
    add("pin", COMBO_TEMPLATES, lambda c: {"c": "-".join(str(rng.randint(0, 59)).zfill(2) for _ in range(3))})
    add("cvv", CVV_TEMPLATES, lambda c: {"n3": str(rng.randint(100, 9999))[:rng.choice([3, 4])]})
    add("login", LOGIN_TEMPLATES, lambda c: {"v": password(rng, plain=False)}, 2)
    add("login", ["login: {v}", "The user logs in as {v}.", "creds: {v}"],
        lambda c: {"v": rng.choice(LOGIN_PLAIN).format(u=c["u"].split("@")[0], w=rng.choice(WORDS))}, 2)
    for provider in ["OpenAI", "Anthropic", "Stripe", "AWS", "GitHub", "Slack", "Google", "Twilio", "SendGrid", "npm",
                     "Hugging Face", "GitLab", "JWT"]:
        add("api_key", rng.sample(KEY_TEMPLATES, 4),
            lambda c, provider=provider: dict(zip(("P", "k"), api_key(rng, provider))))
    add("card", CARD_TEMPLATES, lambda c: {"c": card(rng)}, 3)
    add("iban", IBAN_TEMPLATES, lambda c: {"i": iban(rng)}, 3)
    add("private_key", KEY_HEADER_TEMPLATES,
        lambda c: {"h": rng.choice(PRIVATE_KEYS).format(r=_rand(rng, string.ascii_letters, 12))}, 2)
    add("seed_phrase", PHRASE_TEMPLATES, lambda c: {"ph": " ".join(rng.sample(WORDS, 12))})
    add(None, NEGATIVES, lambda c: {}, 2)
    return rows


# ------------------------------------------------------------------ scoring
def score(detector: str, rows) -> dict:
    f = SecretFilter(detector)
    started = time.perf_counter()
    flagged = [bool(f.find(r["text"])) for r in rows]
    seconds = time.perf_counter() - started
    tp = sum(p and r["secret"] for p, r in zip(flagged, rows))
    fp = sum(p and not r["secret"] for p, r in zip(flagged, rows))
    fn = sum(not p and r["secret"] for p, r in zip(flagged, rows))
    misses = [r["kind"] for p, r in zip(flagged, rows) if r["secret"] and not p]
    return {"precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1), "true_positives": tp,
            "false_positives": fp, "false_negatives": fn, "positives": sum(r["secret"] for r in rows),
            "negatives": sum(not r["secret"] for r in rows), "missed_kinds": sorted(misses),
            # synthetic or project-written sentences, so printing them leaks nothing
            "missed_texts": [r["text"] for p, r in zip(flagged, rows) if r["secret"] and not p],
            "false_positive_texts": [r["text"] for p, r in zip(flagged, rows) if p and not r["secret"]],
            "ms_per_text": 1000 * seconds / len(rows), "n": len(rows)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="seed of the templated set's values")
    ap.add_argument("--show", action="store_true", help="print the missed and falsely flagged sentences")
    args = ap.parse_args(argv)
    sets = {f"templated (seed {args.seed})": templated(args.seed)}
    for name, path in SETS.items():
        sets[name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = {}
    print("| set | detector | recall | precision | TP | FN | FP | positives / negatives | missed kinds | ms/text |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, rows in sets.items():
        for detector in ("library", "regex"):
            r = out.setdefault(name, {})[detector] = score(detector, rows)
            missed = ", ".join(f"{k} x{r['missed_kinds'].count(k)}" for k in sorted(set(r["missed_kinds"]))) or "-"
            print(f"| {name} | {detector} | {r['recall']:.3f} | {r['precision']:.3f} | {r['true_positives']} | "
                  f"{r['false_negatives']} | {r['false_positives']} | {r['positives']} / {r['negatives']} | {missed} | "
                  f"{r['ms_per_text']:.2f} |")
            if args.show and detector == "library":
                for t in r["missed_texts"]:
                    print("   missed:", repr(t))
                for t in r["false_positive_texts"]:
                    print("   false positive:", repr(t))
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/secrets_filter.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
