"""Shared sampling noise (DecodeConfig.shared_noise): the Gumbel-max draw of each row from its own seed."""

import math

import pytest
import torch

from dreamgym_core.experience.decoding import DecodeConfig, Decoder
from dreamgym_core.models import TinyLlamaConfig, build_tiny_llama, train_tokenizer

TEXTS = ["the lamp shows red and the panel is lit", "press blue then green then yellow"]


@pytest.fixture(scope="module")
def model_tok(tmp_path_factory):
    tok = train_tokenizer([t * 5 for t in TEXTS], str(tmp_path_factory.mktemp("tok")), vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    return build_tiny_llama(tok, TinyLlamaConfig(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64)), tok


def test_a_row_s_sample_depends_on_its_seed_and_prompt_not_on_the_batch(model_tok):
    model, tok = model_tok
    dec = Decoder(model, tok, DecodeConfig(greedy=False, constrained=False, max_new_tokens=12, prefill_rows=0))
    a = dec.generate([TEXTS[0], TEXTS[1], TEXTS[0]], row_seeds=[7, 7, 8])
    b = dec.generate([TEXTS[1], TEXTS[0]], row_seeds=[3, 7])   # other neighbours, a later call
    assert a[0] == b[1]                                        # same seed, same prompt: same text
    many = {dec.generate([TEXTS[0]], row_seeds=[s])[0] for s in range(12)}
    assert len(many) > 1                                       # other seeds: other samples
    with pytest.raises(ValueError, match="row_seeds"):
        Decoder(model, tok, DecodeConfig(greedy=True)).generate([TEXTS[0]], row_seeds=[1])
    with pytest.raises(ValueError, match="row_seeds"):
        dec.generate(TEXTS, row_seeds=[1])


def test_gumbel_max_draws_follow_the_softmax():
    """The decoder's rule (argmax of scores / T plus Gumbel noise from the row's generator) against the
    softmax probabilities, counted in a plain loop."""
    scores, temperature, n = torch.tensor([2.0, 1.0, 0.0, -1.0]), 0.7, 20000
    want = torch.softmax(scores / temperature, -1)
    counts = [0] * 4
    gen = torch.Generator().manual_seed(5)
    for _ in range(n):
        u = torch.rand(4, generator=gen)
        counts[int((scores / temperature - torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-7)))).argmax())] += 1
    for k in range(4):
        p = want[k].item()
        assert abs(counts[k] / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3


def test_the_episodes_of_one_task_meet_the_same_draws_in_m_exp(model_tok):
    from dreamgym_core.experience_model import ExperienceModel, SimConfig
    from dreamgym_core.schema import Task
    from dreamgym_core.state import AbstractState

    model, tok = model_tok
    start = AbstractState.make("The lamp turns on.", "control room", ["lamp (red)", "panel (0 of 3 lit)"]).render()
    a, b = (Task(f"lamp/{i}", "lamp", "lamp", "train", i, "Press the lit colour.") for i in (1, 2))
    sim = ExperienceModel(model, tok, initial_state=lambda t: start, propose_candidates=lambda s: ["press red"],
                          cfg=SimConfig(greedy=False, shared_noise=True, max_new_tokens=16, prefill_rows=0))
    sim.reset_batch([a, a, b, b])
    assert sim._row_seed(0) == sim._row_seed(1) != sim._row_seed(2) == sim._row_seed(3)
    texts = []
    sim._generate_chunk = lambda prompts, row_seeds=None: texts.extend(
        sim.decoder.generate(prompts, row_seeds)) or texts[-len(prompts):]
    sim.step_batch(["press red"] * 4)
    assert texts[0] == texts[1] and texts[2] == texts[3]   # one world per task: same prompt, same draw
    greedy_off = ExperienceModel(model, tok, initial_state=lambda t: start, propose_candidates=lambda s: [],
                                 cfg=SimConfig(greedy=False, max_new_tokens=4))
    greedy_off.reset_batch([a])
    calls = []
    greedy_off._generate_chunk = lambda prompts, **kw: calls.append(kw) or ["x"] * len(prompts)
    greedy_off.step_batch(["press red"])
    assert calls == [{}]                                     # without shared_noise no seeds are passed
