"""Rule-made question cues (memory.questions) and their place among a memory's cues."""
from types import SimpleNamespace

import pytest

from memory.cues import Cue, memory_cues
from memory.decoding_step import decode_contexts
from memory.questions import first_person, second_person, template_cues, template_questions


@pytest.mark.parametrize("fact, spoken", [
    ("The user lives in Porto now.", "I live in Porto now"),
    ("The user's sister Marta lives in Madrid.", "My sister Marta lives in Madrid"),
    ("The user doesn't have a car anymore.", "I don't have a car anymore"),
    ("The user uses an inhaler before they run.", "I use an inhaler before I run"),
    ("The user's boyfriend Tiago cooked dinner for them this year.", "My boyfriend Tiago cooked dinner for me this year"),
    ("Le Guin is the user's favourite author.", "Le Guin is my favourite author"),
    ("The flights worry the user more.", "The flights worry me more"),
])
def test_first_person(fact, spoken):
    assert first_person(fact) == spoken


@pytest.mark.parametrize("fact, said_back", [
    ("The user lives in Porto now.", "You live in Porto now."),
    ("The user's sister Marta lives in Madrid.", "Your sister Marta lives in Madrid."),
    ("The user is allergic to peanuts.", "You are allergic to peanuts."),
    ("The user was a nurse.", "You were a nurse."),
    ("The user's flat was small.", "Your flat was small."),
    ("The user uses an inhaler before they run.", "You use an inhaler before you run."),
    ("The flights worry the user more.", "The flights worry you more."),
    ("Caroline joined a mentorship program.", None),
])
def test_second_person(fact, said_back):
    assert second_person(fact) == said_back


def test_a_fact_about_a_named_person_is_asked_about_by_name():
    fact = "Caroline joined a mentorship program for LGBTQ youth over the weekend."
    assert first_person(fact) is None
    made = template_questions(fact)
    assert "Did Caroline join a mentorship program for LGBTQ youth over the weekend?" in made
    assert "When did Caroline join a mentorship program for LGBTQ youth?" in made
    assert "Who joined a mentorship program for LGBTQ youth over the weekend?" in made
    assert template_questions("Caroline and her mentee had a great time at the pride event.") == []  # compound
    assert template_questions("It was a great time.") == []  # no person to ask about


@pytest.mark.parametrize("fact, expected", [
    ("The user lives in Porto now.", ["Do I live in Porto now?", "Where do I live now?"]),
    ("The user's name is Alex.", ["What is my name?"]),
    ("The user is originally from Leeds.", ["Where am I originally from?"]),
    ("The user is allergic to peanuts.", ["Am I allergic to peanuts?", "What am I allergic to?"]),
    ("The user takes Portuguese lessons on Saturday mornings.", ["When do I take Portuguese lessons?"]),
    ("The user goes bouldering twice a week.", ["How often do I go bouldering?"]),
    ("The user shares the flat with their friend Bruno.", ["Who do I share the flat with?"]),
    ("The user works for a health software company called Medilink.", ["Which company do I work for?"]),
    ("The user has a dog called Max.", ["What is my dog called?", "Do I have a dog called Max?"]),
    ("The user's sister Marta lives in Madrid.",
     ["Where does my sister Marta live?", "Where does my sister live?", "Who lives in Madrid?"]),
    ("The user sold their car before the move.", ["Did I sell my car before the move?", "When did I sell my car?",
                                                  "What did I sell before the move?"]),
    ("The user turned 30 yesterday.", ["When did I turn 30?"]),
    ("The user's birthday is on April 17.", ["When is my birthday?"]),
    ("The user's new flat is on the ground floor.", ["Where is my new flat?"]),
    ("The user is reading Piranesi now.", ["What am I reading now?"]),
    ("Big Thief are the user's favourite band now.", ["Who are my favourite band now?"]),
    ("The user got a record player as a present.", ["What did I get as a present?"]),
])
def test_questions_made_by_rule(fact, expected):
    made = template_questions(fact)
    for q in expected:
        assert q in made, (fact, made)


@pytest.mark.parametrize("fact, expected, not_expected", [
    # a plural subject takes a plain verb; a capitalised word ("Leeds") is never the verb
    ("The user's parents live in Leeds.", ["Do my parents live in Leeds?", "Where do my parents live?"],
     ["Does my parents live in leed?"]),
    ("The user's sister is called Marta.", ["What is my sister called?"], ["What is my sister?"]),
    # a name after a noun for a person is asked for with "who", after other nouns with "what"
    ("The user's boyfriend is Tiago.", ["Who is my boyfriend?"], ["What is my boyfriend?"]),
    ("The user's favourite band is Big Thief.", ["What is my favourite band?"], ["Who is my favourite band?"]),
    ("The user is 30 years old.", ["How old am I?"], []),
    # a bare plural object is asked for by its noun ("What do I work?" asks nothing)
    ("The user works normal office hours.", ["What hours do I work?"], ["What do I work?"]),
    # "a trip to Iceland": the "to" chunk belongs to the object that is asked for
    ("The user is planning a trip to Iceland in June.", ["What am I planning in June?"],
     ["What am I planning to Iceland in June?"]),
    ("Joanna's characters she wrote came alive on screen.", [], ["What do Joanna's characters she?"]),
])
def test_agreement_person_names_ages_and_objects(fact, expected, not_expected):
    made = template_questions(fact)
    for q in expected:
        assert q in made, (fact, made)
    for q in not_expected:
        assert q not in made, (fact, made)


def test_a_negated_fact_gets_its_yes_no_question_only():
    assert template_questions("The user doesn't have a car anymore.") == ["Do I have a car anymore?"]


def test_every_question_keeps_a_content_word_of_the_fact():
    # "I am pescatarian" -> "What am I now?" would ask nothing
    assert template_questions("The user is pescatarian now.") == ["Am I pescatarian now?"]
    assert "What do I have?" not in template_questions("The user has mild asthma.")


def test_a_clausal_sentence_is_asked_about_its_main_clause_only():
    made = template_questions("The user got a temp job to help cover expenses while they look for investors.")
    assert made == ["Did I get a temp job to help cover expenses while I look for investors?",
                    "When did I get a temp job to help cover expenses?"]
    made = template_questions("Caroline attended an LGBTQ support group recently and found the transgender "
                              "stories inspiring.")
    assert "What did Caroline attend recently?" in made
    assert "When did Caroline attend an LGBTQ support group?" in made
    assert not any("found" in q for q in made if q.startswith(("What", "When")))


def test_a_past_event_gets_a_when_question_without_its_own_time_words():
    made = template_questions("Melanie ran a charity race for mental health last Saturday.")
    assert "When did Melanie run a charity race for mental health?" in made
    assert template_questions("The user sold their car and doesn't have a car anymore.")[-1] == "When did I sell my car?"
    # a state, not an event: no "when"
    assert not any(q.startswith("When") for q in template_questions("The user lives in Porto."))


def test_a_long_sentence_about_a_feeling_gets_no_garbled_object_question():
    # "be" + an adjective: the old rules' object question would read "What are Melanie's kids about summer break?"
    made = template_questions("Melanie's kids are excited about summer break and they are considering going "
                              "camping next month.")
    assert made == ["Are Melanie's kids excited about summer break and they are considering going camping next month?"]


def _rec(i, text, user="alex", cues=()):
    return SimpleNamespace(id=i, text=text, user_id=user, cues=[Cue(*c).encode() for c in cues])


def test_a_question_two_memories_of_one_user_get_is_dropped_from_both():
    records = [_rec(1, "The user's dog Max is a beagle."), _rec(2, "The user has a dog called Max."),
               _rec(3, "The user's name is Alex."), _rec(4, "The user's name is Sam.", user="sam")]
    made = template_cues(records)
    assert "What is my dog called?" in made[2]
    # "Is my dog a beagle?" is Max's alone; "What is my name?" belongs to two users, one memory each
    assert "What is my name?" in made[3] and "What is my name?" in made[4]
    both = set(template_questions(records[0].text)) & set(template_questions(records[1].text))
    for q in both:
        assert q not in made[1] and q not in made[2]


def test_memory_cues_add_rule_made_questions_after_the_stored_ones():
    rec = _rec(1, "The user lives in Porto now.", cues=[("source", "I live in Porto now."),
                                                         ("question", "Where do I live now?")])
    cues = memory_cues([rec])[1]
    assert cues[0] == Cue("text", rec.text) and cues[1].kind == "source"
    assert [c.text for c in cues if c.kind == "template"] == ["Do I live in Porto now?"]  # no repeat of a stored one
    assert [c.kind for c in memory_cues([rec], templates=False)[1]] == ["text", "source", "question"]
    # step 2 reads a memory back after a rule-made wh-question (its answer is gone from it), not
    # after a yes/no one, which holds the whole fact
    assert "Do I live in Porto now?" not in decode_contexts(cues) and "Where do I live now?" in decode_contexts(cues)
    sister = _rec(2, "The user's sister Marta lives in Madrid.")
    made = [c.text for c in memory_cues([sister])[2] if c.kind == "template"]
    contexts = decode_contexts(memory_cues([sister])[2])
    assert "Where does my sister Marta live?" in made and "Where does my sister Marta live?" in contexts
    assert [q for q in made if q in contexts] == [q for q in made if not q.startswith("Does ")]
