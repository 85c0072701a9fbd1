import pytest

from memory.subjects import subject_key


@pytest.mark.parametrize("fact,key", [
    ("The user lives in Lisbon.", "user:residence"),
    ("The user moved to Porto two weeks ago.", "user:residence"),
    ("The user's sister Marta lives in Madrid.", "sister:residence"),
    ("The user's parents still live in Leeds.", "parent:residence"),
    ("The user works as a nurse.", "user:job"),
    ("The user works at Santa Maria Hospital.", "user:employer"),
    ("The user is 29 years old.", "user:age"),
    ("The user turned 30 yesterday.", "user:age"),
    ("The user's favourite food is ramen.", "user:favorite_food"),
    ("The user's favorite band is Big Thief.", "user:favorite_band"),
    ("The user's dog is called Max.", "dog:name"),
    ("The user is pescatarian.", "user:diet"),
    ("The user shares the flat with their friend Bruno.", "user:household"),
    ("The user lives with Tiago now.", "user:household"),
    ("The user's sister lives with her husband.", "sister:household"),
    ("The user lives with their dog Max.", None),  # a pet is no household change
    ("The user lives with two cats.", None),
    ("The user drives an old Fiat Panda.", "user:car"),
    ("The user doesn't have a car anymore.", "user:car"),
    ("The user bought a new electric car.", "user:car"),
    ("The user drives to work.", "user:commute"),
    ("The user likes jazz.", None),
    ("The user plays the guitar.", None),
])
def test_subject_key(fact, key):
    assert subject_key(fact) == key


def test_every_annotated_update_in_the_sample_facts_shares_its_key():
    """``examples/expected_facts.json`` marks which fact supersedes which (written with the
    sample chats): each such pair must get one subject key, or the update rule misses it."""
    import json
    from pathlib import Path

    facts = json.loads((Path(__file__).parent.parent / "examples" / "expected_facts.json").read_text())
    by_id = {f["id"]: f for f in facts}
    pairs = [(f["fact"], by_id[f["supersedes"]]["fact"]) for f in facts if f.get("supersedes")]
    assert len(pairs) >= 13
    missed = [(new, old) for new, old in pairs if subject_key(new) is None or subject_key(new) != subject_key(old)]
    assert not missed
