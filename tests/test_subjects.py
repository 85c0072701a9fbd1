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
    ("The user likes jazz.", None),
    ("The user plays the guitar.", None),
])
def test_subject_key(fact, key):
    assert subject_key(fact) == key
