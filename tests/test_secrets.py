"""The secret filter (memory.secrets) on real text: credentials stated in words, in memories
(third person) and raw chat (first person), provider key formats, and look-alikes that must
survive. The labelled benchmark is ``python -m bench.secrets_filter``."""
import pytest

from memory.secrets import SecretFilter


@pytest.fixture(scope="module")
def library():
    return SecretFilter("library")


STATED = [
    # the phrasings
    "The user's Stripe key is sk-live-4eC39HqLyjWDarjtT1zdp7dcAbCdEf.",
    "pw: xyz123",
    "my pw: xyz",
    "the wifi password Tulip42 is on the fridge",
    "The user logs in with hunter2 as their password.",
    # stated in words, third and first person
    "The user's wifi password is Tulip42.",
    "My email password is sunflower",
    "The user's router password is admin123.",
    "The password to his router is walnut#13.",
    "the password for the user's Wi-Fi network at the beach house is seashell77",
    "The user set their Netflix password to Maple-Otter-River.",
    "I changed my password to sunflower yesterday",
    "The user's Outlook password? It's Ember#1990.",
    "my password's Tulip42",
    "passwd=Kx9!mQ2pz",
    "The user's netflix pwd: blueSky9",
    "Admin pass: Rainbow77",
    "The user's password is \"open sesame\".",
    "The wifi key is 8F3KD92LQ0ZX",
    "Password123! is what the user uses everywhere.",
    # value before the credential word
    "Tulip42 is my wifi password",
    "4711 is the user's PIN.",
    "I use qwerty123 as my password",
    "The user chose Orchid!55 for their email password.",
    "The user typed hunter2 into the password field.",
    # asked and answered
    'Asked what their PIN is, the user answered "4711"',
    "Asked for the alarm code, the user said 1942.",
    # PINs and codes
    "The user's PIN is 0815.",
    "their pin: 1234",
    "PIN code 88231",
    "The code for the front door is 5521",
    "The code to get into the building is 7712.",
    "The user's voicemail code is 4321.",
    "The user's safe combination is 12-34-56.",
    "The user's card's CVV is 123.",
    # logins
    "login: alice / Tulip42",
    "user/pass: admin/admin",
    "u/p sam_92/window91",
    "creds for the NAS: tom:walnut88",
    "The user logs in as admin/admin.",
    "username: bob password: river",
    "username admin, password walnut",
    "The user's login is jane@x.com / Spring2024!",
    # keys stated with a key word
    "my api key is 9f8e7d6c5b4a39281716151413121110aabbccdd",
    "the token is 7f3a9b2c1d",
    "my aws secret access key is wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "His wallet seed phrase is \"harbor pepper pixel falcon lantern canyon orchid glacier river walnut rocket copper\"",
]


@pytest.mark.parametrize("text", STATED)
def test_credentials_stated_in_words_are_found(library, text):
    assert library.find(text), text


PROVIDER_KEYS = [
    "sk-proj-Ab3dEf6hIj9kLmN0pQrStUvWxYz1234567890ABCD",      # OpenAI project key
    "sk-ant-api03-" + "aB3" * 30,                              # Anthropic
    "sk_live_4eC39HqLyjWDarjtT1zdp7dc",                        # Stripe secret
    "rk_live_51Hxyz0987654321abcdefABCDEF",                    # Stripe restricted
    "pk_live_51Hxyz0987654321abcdefABCDEF",                    # Stripe publishable: dropped too (documented)
    "AKIAIOSFODNN7EXAMPLE",                                    # AWS
    "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",                # GitHub classic
    "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOP",
    "xoxb-2631234567-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",  # Slack
    "AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q",                 # Google
    "SK" + "0123456789abcdef" * 2,                             # Twilio
    "SG.abcdefghij0123456789AB.abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",  # SendGrid
    "npm_abcdefghijklmnopqrstuvwxyz0123456789",                # npm
    "hf_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789",                 # Hugging Face
    "glpat-aB3dE6gH9jK2mN5pQ8sT",                              # GitLab
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "postgres://app:p4ssw0rd!@10.0.0.5:5432/main",             # basic auth in a URL
    "-----BEGIN OPENSSH PRIVATE KEY-----",
    "-----BEGIN PGP PRIVATE KEY BLOCK-----",
]


@pytest.mark.parametrize("key", PROVIDER_KEYS)
def test_provider_key_formats_are_found_bare_and_in_a_sentence(library, key):
    assert library.find(key), key
    assert library.find(f"The user pasted {key} into the chat."), key


def test_cards_and_ibans_pass_only_with_their_checksums(library):
    assert "Card Number" in library.find("my visa 4111-1111-1111-1111 exp 05/29")
    assert "IBAN" in library.find("Pay into BE68539007547034")  # mod 97 valid, national check digits not
    assert not library.find("Invoice 4111111111111112 is overdue.")
    assert not library.find("The user's EAN barcode is 4006381333931.")  # Luhn-valid by chance, a valid EAN-13


LOOKALIKES = [
    "The user's password is too short.",
    "The user's password is 12 characters long.",
    "The user's password policy changed in 2023.",
    "The user forgot their password again.",
    "The user's password manager is 1Password.",
    "The user's password expired on 12/05/2024.",
    "The user's wifi password is on the router sticker.",
    "The user's wifi password is shared with guests.",
    "The user changed the password to something stronger.",
    "Their password is the name of their dog.",
    "The user's password hint is their cat's name.",
    "The PIN pad at the shop was broken.",
    "The PIN is 4 digits long.",
    "The user changed their PIN last week.",
    "The user's PIN was blocked after 3 attempts.",
    "The wifi is slow in the evenings.",
    "The key is under the mat.",
    "The key takeaway was to sleep more.",
    "The user gave the teacher a token of thanks.",
    "The token of the bus is 2 euros.",
    "The user's secret ingredient is cinnamon.",
    "The user has a bus pass and a library card.",
    "The bus pass is 45 euros a month.",
    "The user passed the exam with 92%.",
    "The user's phone number is +44 20 7946 0958.",
    "Call 0800 123 4567 for support.",
    "The user lives at flat 12, Maple Street 221.",
    "The user's order number is #4411-2233.",
    "The flight LH2024 leaves at 9:45.",
    "The user runs version 2.3.1 of the app.",
    "The user bought an iPhone 15.",
    "My zip code is 94103 and the area code is 415.",
    "The user's dress code is smart casual.",
    "The promo code is SAVE20.",
    "The user's sort code is 12-34-56.",
    "The user's last commit was 3f9a1c0b2d4e5f60718293a4b5c6d7e8f9a0b1c2.",
    "The user logs in with Google.",
    "The user signs in with email/password.",
    "The user logs in with work/personal accounts.",
    "The user's username is jdoe2024.",
    "The user's credentials are stored in a vault.",
    "The user's API key expires next month.",
    "The user's session token expired after 30 minutes.",
    "123456 is the most common password.",
    "1Password is the user's password manager.",
]


@pytest.mark.parametrize("text", LOOKALIKES)
def test_lookalikes_survive(library, text):
    assert library.find(text) == [], text


def test_find_returns_types_never_values(library):
    text = "The user's wifi password is Tulip42 and their key is sk_live_4eC39HqLyjWDarjtT1zdp7dc."
    types = library.find(text)
    assert "Stated Credential" in types and "Stripe Access Key" in types
    assert not any("Tulip42" in t or "4eC39" in t for t in types)


def test_the_default_beats_the_regex_baseline_on_the_templated_set():
    """The benchmark's generated set: recall 1.0 and precision >= 0.98 for the default detector."""
    from bench.secrets_filter import score, templated

    rows = templated(0)
    assert sum(r["secret"] for r in rows) >= 150 and sum(not r["secret"] for r in rows) >= 150
    r = score("library", rows)
    assert r["recall"] == 1.0 and r["precision"] >= 0.98, (r["missed_texts"], r["false_positive_texts"])
    assert score("regex", rows)["recall"] < r["recall"]
