"""Issue 27 item 6: every parser of model output (M_exp: ``exp_format.parse_output`` and
``parse_pointer_output``; M_task: ``curriculum.parse_task_output``; the state text both produce:
``AbstractState.parse``) fuzzed with seeded random text and mutations of valid outputs.

Each parser documents its failure result (``Prediction(ok=False, error=...)``, ``ParseFailure``,
``ValueError`` for ``AbstractState.parse``); the catch-all in the first two would hide a crash as
``internal:*`` / ``error:*``, so the test also asserts that no case ever reaches it.
"""

import random

import pytest

from dreamgym_core.curriculum import ParseFailure, TaskProposal, parse_task_output
from dreamgym_core.exp_format import action_refs, parse_output, parse_pointer_output, render_pointer_target, render_target
from dreamgym_core.state import AbstractState
from dreamgym_core.state_delta import Prediction, diff

N = 1500     # cases per parser (x 5 parsers)
S0 = AbstractState.make("You are in the kitchen.", "kitchen", ["counter: apple", "fridge (closed)", "knife"],
                        ["east: pantry"], ["coin"])
S1 = AbstractState.make("You open the fridge.", "kitchen", ["counter: apple", "fridge (open): milk", "knife"],
                        ["east: pantry"], ["coin"])
S2 = AbstractState.make("You take the knife.", "kitchen", ["counter: apple", "fridge (closed)"], ["east: pantry"],
                        ["coin", "knife"])
CATALOGUE = ("counter: apple", "fridge (closed)", "knife", "coin", "red hat")
TOKENS = ["<think>", "</think>", "\n", "valid: yes", "valid: no", "reward: 1", "reward: nan", "reward: 1e999",
          "done: yes", "done: maybe", "progress: 50", "progress: -1", "feedback: ", "location: ", "objects: ",
          "objects += ", "objects -= ", "inventory: ", "exits: ", " | ", "@", "@1", "@9", "@0", "@99999", "@@",
          "instruction: ", ":", "=", "+", "-", "(open)", "(closed)", ": empty", "\r", "\t", "\x00", "\u2028",
          "\ud7ff", "é", "🙂", " " * 50, "9" * 400, "<think><think>", "</think></think>", "\\", "\"", "'"]


def _valid_exp_outputs() -> list[str]:
    outs = []
    for a, b, valid, reward, done in [(S0, S1, True, 0.0, False), (S1, S2, True, 1.0, True),
                                      (S0, S0, False, 0.0, False), (S2, S0, True, 0.0, True)]:
        d = diff(a, b, valid=valid, reward=reward, done=done, progress=None, next_progress=None)
        outs.append(render_target("the action opens it", d)[0])
    return outs


def _valid_pointer_outputs() -> list[tuple[str, AbstractState, tuple[str, ...]]]:
    outs = []
    for a, b, action in [(S0, S1, "open fridge"), (S0, S2, "take knife")]:
        d = diff(a, b, valid=True, reward=0.0, done=False, progress=None, next_progress=None)
        refs = action_refs(a, action)
        outs.append((render_pointer_target("why", d, a, refs).text, a, refs))
    return outs


def _valid_task_outputs() -> list[str]:
    return ["<think>one more item</think>\ninstruction: Put the knife in the fridge.\n" + S0.render(),
            "instruction: Put.\nfeedback: x\nlocation: kitchen\nobjects: @3 | @1 | @2\nexits: \ninventory: ",
            "instruction: Put.\nfeedback: You are on the moon.\nlocation: moon\nobjects: @5 | @2\n"]


def _mutate(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        i = rng.randint(0, len(text))
        if op == 0:
            text = text[:i] + rng.choice(TOKENS) + text[i:]
        elif op == 1 and text:
            j = min(len(text), i + rng.randint(1, 20))
            text = text[:i] + text[j:]
        elif op == 2:
            text = text[:i]                                          # truncated output (max tokens hit)
        elif op == 3:
            lines = text.split("\n")
            rng.shuffle(lines)
            text = "\n".join(lines)
        elif op == 4:
            lines = text.split("\n")
            k = rng.randrange(len(lines))
            text = "\n".join(lines[:k] + [lines[k]] * rng.randint(2, 3) + lines[k + 1:])   # repeated line
        elif op == 5:
            text = text[:i] + chr(rng.choice([rng.randint(0, 0x7f), rng.randint(0x80, 0xd7ff),
                                              rng.randint(0xe000, 0x10ffff)])) + text[i:]
        else:
            text = text.replace(rng.choice(["yes", "no", "0", "1", "@", ":", "|", "\n"]), rng.choice(TOKENS))
    return text


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(TOKENS) if rng.random() < 0.5 else chr(rng.randint(0, 0x2fff))
                   for _ in range(rng.randint(0, 60)))


def _cases(seeds: list[str], seed: int) -> list[str]:
    rng = random.Random(seed)
    return [_mutate(rng, rng.choice(seeds)) if k % 3 else _random_text(rng) for k in range(N)]


def test_m_exp_parse_output_fuzz():
    seeds = _valid_exp_outputs()
    assert all(parse_output(s).ok for s in seeds)          # the mutations start from valid outputs
    oks = 0
    for text in _cases(seeds, 0) + [None, 3, b"<think>"]:
        p = parse_output(text)
        assert isinstance(p, Prediction) and p.ok == (p.delta is not None), repr(text)
        assert not p.error.startswith("internal:"), (p.error, repr(text))
        oks += p.ok
    assert 0 < oks < N                                       # both outcomes were exercised


def test_m_exp_pointer_parser_fuzz():
    seeds = _valid_pointer_outputs()
    assert seeds and all(parse_pointer_output(t, s, r).ok for t, s, r in seeds)
    rng = random.Random(1)
    for text in _cases([t for t, _, _ in seeds], 1):
        _, state, refs = rng.choice(seeds)
        p = parse_pointer_output(text, state, refs)
        assert isinstance(p, Prediction) and not p.error.startswith("internal:"), (p.error, repr(text))


@pytest.mark.parametrize("form", ["plain", "pointer", "template"])
def test_m_task_parser_fuzz(form):
    seeds = _valid_task_outputs()
    cat, template = {"plain": (None, None), "pointer": (CATALOGUE, None), "template": (CATALOGUE, S0.render())}[form]
    seeds = [s for s in seeds if isinstance(parse_task_output(s, cat, template), TaskProposal)]
    assert seeds
    for text in _cases(seeds, 2 + len(form)):
        out = parse_task_output(text, cat, template)
        assert isinstance(out, (TaskProposal, ParseFailure)), repr(text)
        assert isinstance(out, TaskProposal) or not out.reason.startswith("error:"), (out.reason, repr(text))


def test_state_parser_fuzz():
    rng = random.Random(5)
    for text in _cases([S0.render(), S1.render(), S2.render()], 5):
        try:
            st = AbstractState.parse(text)
        except ValueError:
            continue
        assert AbstractState.parse(st.render()) == st, repr(text)   # what parses round-trips
    assert rng is not None
