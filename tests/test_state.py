import pytest
from hypothesis import given, settings, strategies as st

from dreamgym_core.state import AbstractState

_item = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="|\n\r"),
                min_size=1, max_size=20).map(str.strip).filter(bool)


def test_make_canonicalizes_order_whitespace_and_duplicates():
    s = AbstractState.make("You  take\nthe apple.", " kitchen ", ["fridge (closed)", "counter: apple", "fridge (closed)"],
                           [], ["knife", "cookbook"])
    assert s.objects == ("counter: apple", "fridge (closed)")
    assert s.inventory == ("cookbook", "knife")
    assert s.feedback == "You take the apple."
    assert s.render().splitlines()[2] == "objects: counter: apple | fridge (closed)"


@settings(max_examples=200, deadline=None)
@given(fb=st.text(max_size=40), loc=st.text(max_size=15), objs=st.lists(_item, max_size=6),
       exits=st.lists(_item, max_size=3), inv=st.lists(_item, max_size=4))
def test_render_parse_round_trip(fb, loc, objs, exits, inv):
    s = AbstractState.make(fb, loc, objs, exits, inv)
    assert AbstractState.parse(s.render()) == s


@pytest.mark.parametrize("text,msg", [
    ("feedback: x\nlocation: k", "missing field"),
    ("feedback: x\nfeedback: y\nlocation: \nobjects: \nexits: \ninventory: ", "repeated"),
    ("colour: red\nfeedback: x", "unknown field"),
    ("just words", "expected"),
])
def test_parse_errors_name_the_problem(text, msg):
    with pytest.raises(ValueError, match=msg):
        AbstractState.parse(text)


def test_entities_include_contents_and_inventory():
    s = AbstractState.make("", "kitchen", ["fridge (open): apple, milk", "counter: empty", "stove", "cupboard (closed)"],
                           [], ["knife"])
    assert s.entities() == ["counter", "cupboard", "fridge", "apple", "milk", "stove", "knife"]
