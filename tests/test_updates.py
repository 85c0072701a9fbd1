"""The update rule reads change from the facts themselves (memory.updates); these facts are
written for the test, about people and things in no data set of the project."""
import pytest

from memory.ingest import clamp_timestamps
from memory.schema import MemoryCandidate
from memory.updates import parse_fact, subject_key, supersedes


@pytest.mark.parametrize("old,new", [
    ("The user lives in Lyon.", "The user moved to Grenoble last spring."),           # functional relation
    ("The user lives in a dorm on campus.", "The user moved out of the dorm."),
    ("The user works as a baker.", "The user works as a tram driver now."),
    ("The user's brother Oskar lives in Graz.", "The user's brother Oskar moved to Linz."),
    ("The user's favourite film is Alien.", "The user's favourite film is Paterson these days."),
    ("The user shares a flat with their friend Noor.", "The user lives with their partner Ilse."),
    ("The user owns a red Vespa.", "The user sold the Vespa in May."),                  # a change verb
    ("The user has a parrot named Kiwi.", "The user's parrot Kiwi died last week."),
    ("The user rows on Wednesdays.", "The user stopped rowing after the injury."),
    ("The user plays cello in a youth orchestra.", "The user quit the youth orchestra."),
    ("The user drinks four cups of tea a day.", "The user now drinks two cups of tea a day."),  # a new quantity
    ("The user plans to take the driving test in June.", "The user passed the driving test."),  # a plan's outcome
    ("The user's choir meets on Mondays.", "The user's choir meets on Thursdays, not Mondays."),  # a correction
    ("The user's shop doesn't sell coffee beans yet.", "The user's shop now sells coffee beans."),  # negation
    ("The user is dating Femi.", "The user and Femi broke up in March."),
    ("The user is going out with Arne.", "Arne and the user split up."),              # a named thing ended
    ("The user's hamster Biscuit sleeps all day.", "The user's hamster Biscuit died on Sunday."),
    ("The user is sitting the bar exam in May.", "The user passed the bar exam."),     # a progressive plan
    ('Asked how often are they swimming, the user answered "Twice a week"',             # the question's verb
     "Now the user swims three times a week."),
    ("The user's 2012 scooter keeps stalling.", "The user sold the scooter last month."),  # a year before the owner
    ("The user sings in a gospel choir.", "The user quit the choir."),                 # what the change ends
    ("The user takes the tram to the office.", "The user walks to the office instead of taking the tram."),  # instead of
    ("The user drinks oat milk.", "The user drinks soy milk rather than oat milk now."),
    ("The user's studio is on the fifth floor.", "The user's new studio is on the first floor."),  # a new one
    ("The user's bike is a heavy Dutch bike.", "The user's new bike is a carbon racer."),
    ("The user's rent is 900 euros a month.", "The user's rent is 950."),               # a new value, same thing
    ("The user has left the hockey team for now.", "The user has rejoined the hockey team."),  # taken up again
    ("The user intends to enrol in a nursing course next year.",                        # the plan's verb, done
     "The user has enrolled, and classes start in May."),
    ("The user wants to buy a house in Cork.", "The user bought a house."),            # an irregular past
    ("The user is applying to Trinity College.", "The user got an offer from Trinity College."),  # an attempt ended
    ("The user lives in Hove with a housemate.", "The user lives alone in a studio in Brixton."),  # an adverb between
    ("The user is 41.", "The user is 42 years old."),
    ("The user's lesson is on 3 May.", "The user's lesson is on 5 May (not the 3rd)."),   # a correction in brackets
    ("The user works at a garage in Tilburg.",                                         # "planning" is no plan here
     "The user quit the garage and starts as a planning assistant at the port next week."),
    ("The user swims early, before the office opens.", "The user has no more early swims since the new job."),
    ("The user's fiancé Bram is a welder.", "The user and Bram broke up in June."),  # the owner named
    ("The user and his partner plan to buy a boat.", "The user and Noa have bought a boat."),  # a joint subject
    ("The user gave up sugar completely.", "The user eats sugar again on weekends."),   # again, after an ending
    ("The user climbs at the wall 4x a week.", "The user climbs at the wall twice a week."),  # a new frequency
    ("The user teaches four days a week.", "The user teaches three days a week from May."),
])
def test_a_newer_fact_replaces_the_older(old, new):
    assert supersedes(old, new), (old, new)


@pytest.mark.parametrize("old,new", [
    ("The user likes jazz.", "The user likes hiking."),                       # many values at once
    ("The user plays the guitar.", "The user now plays tennis."),
    ("The user's sister lives in Madrid.", "The user lives in Porto."),         # another owner
    ("The user lives in Lyon.", "The user's sister lives in Nice."),
    ("The user has a parrot named Kiwi.", "Kiwi is now 12."),                  # about the thing, no change
    ("The user lives in a college dorm.", "The user quit the college chess club."),  # one shared word, elsewhere
    ("The user rides a blue bike.", "The user plans to sell the bike before moving."),  # only a plan
    ("The user has a bad knee and doesn't ski.", "The user has a bad knee, which makes stairs hard."),
    ("The user lives with their partner Ilse.", "The user lives with their dog Pip."),  # a pet is no housemate
    ("The user moved to Porto two weeks ago.", "The user lives in Porto now."),      # the same value restated
    ('Asked if they own a bike, the user answered "Yes. A blue one"',                 # "Yes" is no shared name
     'Asked if they had pets, the user answered "Yes. Bo died in May"'),
    ("The user is used to small vans.", "The user sold their van."),               # another mention of vans
    ("The user is putting together a pottery show next month.",                      # nothing done: no outcome
     "The user is inspired by the pottery show crowd."),
    ("The user started selling lemon tarts at the cafe.", "The user moved the cafe to a bigger street."),
    ("The user's hamster Biscuit sleeps all day.", "The user's sister died in 2019."),   # another owner ended
    ("The user works at a bakery.", "The user naps instead of working on Sundays."),  # an activity, no named thing
    ("The user is learning the violin.", "The user is learning Korean now."),         # two activities at once
    ("The user wants to get a dog.", "The user got a new phone."),                   # a light verb names no plan
    ("The user wants to visit Paris.", "The user visited Rome."),                    # the verb, not the plan's object
    ("The user's rent is 900 euros a month.", "The user's rent is due on the 1st."),  # another kind of statement
    ("The user's sister is 30.", "The user's brother is 25."),                        # another owner
    ("The user's studio has big windows.", "The user's new studio is on the first floor."),  # another kind of thing
    ("The user's new studio is on the first floor.", "The user's new studio is on a quiet street."),
    ("The user has a cat named Olive, a 5-year-old tabby.",                            # a pet's age, not the user's
     "The user adopted a lurcher named Moss, 2 years old."),
    ("The user lives with her partner, Ruud.", "The user's partner Ruud also stopped drinking."),  # Ruud's change
    ("The user flies to Oslo on the Monday flight, not the ferry.", "The user leaves for Oslo on Tuesday."),  # a departure
    ("The user is a bus driver in Ghent.", "The user cycles to work instead of taking the bus."),  # another activity
    ("The user and his partner had a lovely and calm holiday.", "The user just finished a lovely novel."),
    ("The user works four days a week.", "The user works out three days a week."),  # another verb
    ("The user moved to Bergen in 2019.", "The user visited Bergen again in May."),   # a move is no ending
    ('Asked what their grade is, the user answered "8.1".',
     'Asked what they spend each month, the user answered "about 300 on rent, 2 times a week out"'),
])
def test_unrelated_or_compatible_facts_are_both_kept(old, new):
    assert not supersedes(old, new), (old, new)


def test_parse_reads_owner_relation_and_value():
    p = parse_fact("The user's older brother Oskar moved to Linz in 2024.")
    assert p.owner.startswith("broth") and p.owner.endswith("oskar") and p.relation == "live_in"
    assert "linz" in p.words and "linz" in p.names
    assert subject_key("The user works as a tram driver.") == "user:work_as"
    assert subject_key("The user likes tram rides.") is None


@pytest.mark.reliability(fault="A session dated 2099; a message older than the one before it",
                         outcome="clamped before ordering, logged with the session")
def test_future_and_backwards_timestamps_are_clamped(caplog):
    cands = [MemoryCandidate("The user lives in Lyon.", "u", "s1", 0, "2099-01-01T00:00:00+00:00"),
             MemoryCandidate("The user works as a baker.", "u", "s2", 0, "2025-05-02T10:00:00+00:00"),
             MemoryCandidate("The user rows.", "u", "s2", 3, "2025-05-01T10:00:00+00:00")]
    with caplog.at_level("WARNING"):
        out = {c.text: c.timestamp for c in clamp_timestamps(cands, now="2026-01-01T00:00:00+00:00")}
    assert out["The user lives in Lyon."] == "2026-01-01T00:00:00+00:00"
    assert out["The user rows."] == "2025-05-02T10:00:00+00:00"   # not before the message before it
    assert out["The user works as a baker."] == "2025-05-02T10:00:00+00:00"
    assert "session s1" in caplog.text and "session s2" in caplog.text
