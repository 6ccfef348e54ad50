"""The experience model M_exp as a simulator (paper Eq. 4): a ``BatchEnv`` policies roll out in.

Eq. 4: (R_t, s_{t+1}, r_{t+1}) ~ M_exp(. | s_t, a_t, H_t, D_k): given the task, a history window,
the current abstract state, the action and k retrieved demonstrations, M_exp writes a reasoning
trace and then the next state and reward. ``ExperienceModel.step_batch`` builds every live
episode's prompt (``prompt.step_prompt``), retrieves D_k for the whole batch in one call, decodes
the batch (``decoding.Decoder``) and applies the parsed predictions.

Departures from the paper (and why):
* The model predicts a structured change to the abstract state (``exp_format``), which code
  applies; tiny CPU models cannot regenerate whole states. Pointer-form predictions are
  relexicalized before they are applied, so callers always see real abstract states.
* An invalid action leaves the state unchanged with feedback, as the real env does; the paper's
  "invalid action leads to a failure state" is ``SimConfig.invalid_ends_episode``. An output that
  does not parse always ends the synthetic episode as a failure (and is counted).
* With progress (``PromptConfig.progress``) the simulator carries the predicted dense score and the
  episode is won when it reaches 100 (``outcome``), whatever the reward field says. Progress,
  placements and affordances are side channels: the checkpoint's prompt config has them on only
  where the env's adapter declared them at training (``prompt.provided``); without them the model's
  own reward and done decide, as in the paper. Candidates for synthetic states come from the
  ``propose_candidates`` argument: the adapter's state-only rule where it declares one
  (``SideChannels.candidate_rule``), otherwise the candidates read off the logs.
* Retrieval is pinned by the caller: the loop's retriever reads the replay buffer as it stood at
  the start of the iteration (``retrieval.Retriever``), so a re-run simulates what the first did.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, fields, replace
from typing import Callable, Sequence

from dreamgym_core.envs.base import Observation, StepResult
from dreamgym_core.experience.decoding import DecodeConfig, Decoder
from dreamgym_core.experience.prompt import Knowledge, PromptConfig, Query, Retrieve, _feedback, demos_for, parse_for, \
    step_prompt
from dreamgym_core.schema import RawObs, Task
from dreamgym_core.state import AbstractState
from dreamgym_core.state_delta import Prediction, StateDelta, apply

_DECODE_KNOBS = tuple(f.name for f in fields(DecodeConfig))


@dataclass(frozen=True, init=False)
class SimConfig:
    """What a simulated step means (the prompt, the episode's end) plus how it is decoded.

    The decoding knobs live in ``decoding`` (a ``DecodeConfig``); they can also be passed and read
    flat: ``SimConfig(batch_size=8).batch_size == SimConfig(batch_size=8).decoding.batch_size == 8``.
    """

    prompt: PromptConfig
    invalid_ends_episode: bool
    """Paper's variant: an action predicted invalid ends the episode as a failure."""
    decoding: DecodeConfig

    def __init__(self, prompt: PromptConfig = PromptConfig(), invalid_ends_episode: bool = False,
                 decoding: DecodeConfig | None = None, **decode_knobs):
        unknown = sorted(set(decode_knobs) - set(_DECODE_KNOBS))
        if unknown:
            raise TypeError(f"SimConfig: unknown field(s) {unknown}; decoding knobs are {list(_DECODE_KNOBS)}")
        object.__setattr__(self, "prompt", prompt)
        object.__setattr__(self, "invalid_ends_episode", bool(invalid_ends_episode))
        object.__setattr__(self, "decoding", replace(decoding or DecodeConfig(), **decode_knobs))

    def __getattr__(self, name: str):
        if name in _DECODE_KNOBS:  # flat read of a decoding knob: cfg.batch_size
            return getattr(self.decoding, name)
        raise AttributeError(name)


@dataclass
class SimStats:
    steps: int = 0
    parse_failures: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    retrieval_seconds: float = 0.0
    """Time spent retrieving D_k (embedding + vector query), part of a step but not of ``seconds``."""
    prompts: int = 0
    prompts_with_demos: int = 0
    """Prompts that showed at least one retrieved demonstration (0 when retrieval is off)."""


class ExperienceModel:
    """M_exp as a ``BatchEnv``: policies roll out in it exactly as in a real environment.

    initial_state(task) gives the abstract start state (Task.initial_state for synthetic tasks, a
    real reset or offline data for env tasks); propose_candidates(state) gives candidate actions for
    synthetic states (the adapter's state-only rule).
    """

    name = "m_exp"

    def __init__(self, model, tokenizer, *, initial_state: Callable[[Task], str],
                 propose_candidates: Callable[[str], list[str]], retrieve: Retrieve | None = None,
                 cfg: SimConfig = SimConfig(), initial_progress: Callable[[Task], int] | None = None,
                 knowledge: Knowledge | None = None):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.knowledge = dict(knowledge or {})
        self.initial_state, self.propose, self.retrieve = initial_state, propose_candidates, retrieve
        self.initial_progress = initial_progress or (lambda task: 0)
        self.stats = SimStats()
        self.decoder = Decoder(model, tokenizer, cfg.decoding, prefix="" if cfg.prompt.use_cot else "<think></think>\n",
                               stats=self.stats)
        self.last_prompts: list[str] = []
        """The prompts of the latest ``step_batch`` (for inspection and tests)."""

    # -- one batched generation: prompts -> parsed predictions --------------------------------
    def predict(self, prompts: Sequence[str],
                contexts: Sequence[tuple[str, Sequence[str] | None]] | None = None,
                row_seeds: Sequence[int] | None = None) -> list[Prediction]:
        """Generate and parse. ``contexts`` (one (state, refs) per prompt, from ``refs_for``) makes
        pointer-form outputs parse into real deltas for that state; without it outputs are literal.
        ``row_seeds``: per-prompt sampling seeds (``DecodeConfig.shared_noise``)."""
        if contexts is not None and len(contexts) != len(prompts):
            raise ValueError("predict: contexts needs one (state, refs) per prompt")
        out: list[Prediction] = []
        for i in range(0, len(prompts), self.cfg.batch_size):
            chunk = prompts[i:i + self.cfg.batch_size]
            texts = self._generate_chunk(chunk) if row_seeds is None else \
                self._generate_chunk(chunk, row_seeds=row_seeds[i:i + len(chunk)])
            ctx = contexts[i:i + len(texts)] if contexts is not None else [("", None)] * len(texts)
            preds = [parse_for(t, st, refs) for t, (st, refs) in zip(texts, ctx)]
            self.stats.parse_failures += sum(not p.ok for p in preds)
            out.extend(preds)
        return out

    def _generate_chunk(self, prompts: Sequence[str], row_seeds: Sequence[int] | None = None) -> list[str]:
        """One decoding batch (a test can script M_exp by overriding this)."""
        return self.decoder.generate(prompts, row_seeds)

    def _row_seed(self, i: int) -> int:
        """Row i's sampling seed under ``shared_noise``: its task and step (and the decoding seed), so
        every episode of a task meets the same draws at the same step, in every iteration."""
        key = f"{self.cfg.decoding.seed}|{self._tasks[i].task_id}|{len(self._history[i])}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


    # -- BatchEnv -----------------------------------------------------------------------------
    def reset_batch(self, tasks: Sequence[Task]) -> list[Observation]:
        self._tasks = list(tasks)
        self._states = [self.initial_state(t) for t in tasks]
        self._history: list[list[tuple[str, str]]] = [[] for _ in tasks]
        self._live = [True] * len(tasks)
        self._progress = [self.initial_progress(t) if self.cfg.prompt.progress else None for t in tasks]
        return [self._obs(s) for s in self._states]

    def _obs(self, state: str) -> Observation:
        cands = tuple(self.propose(state))
        return Observation(state=state, candidates=cands, raw=RawObs(feedback=_feedback(state), candidates=cands))

    def step_batch(self, actions: Sequence[str | None]) -> list[StepResult | None]:
        live = [i for i, a in enumerate(actions) if a is not None and self._live[i]]
        t0 = time.perf_counter()
        demos = demos_for(self.retrieve, [Query(self._tasks[i].task_id, self._states[i], actions[i]) for i in live],
                          self.cfg.prompt)  # one retrieval call for the whole batch step
        self.stats.retrieval_seconds += time.perf_counter() - t0
        prompts, contexts = [], []
        for i, d in zip(live, demos):
            prompt, refs = step_prompt(self._tasks[i].instruction, self._history[i], self._states[i], actions[i],
                                       self.cfg.prompt, demos=d, progress=self._progress[i], known=self.known)
            prompts.append(prompt)
            contexts.append((self._states[i], refs))
        self.last_prompts = prompts
        self.stats.prompts += len(prompts)
        self.stats.prompts_with_demos += sum(bool(d) for d in demos)
        shared = self.cfg.decoding.shared_noise and not self.cfg.decoding.greedy
        preds = (self.predict(prompts, contexts, [self._row_seed(i) for i in live] if shared else None)
                 if prompts else [])
        out: list[StepResult | None] = [None] * len(actions)
        for i, pred in zip(live, preds):
            delta = pred.effective_delta()
            state = AbstractState.parse(self._states[i])
            nxt = apply(state, delta).render()
            self._progress[i], won, done = outcome(pred, self._progress[i])
            done = done or (not delta.valid and self.cfg.invalid_ends_episode)
            reward = 1.0 if won else 0.0
            self._states[i] = nxt
            self._history[i].append((actions[i], _feedback(nxt)))
            self._live[i] = not done
            self.stats.steps += 1
            score = reward if self._progress[i] is None else self._progress[i] / 100
            out[i] = StepResult(obs=self._obs(nxt), reward=reward, score=score, done=done, won=won,
                                lost=done and not won, valid=bool(delta.valid and pred.ok), crashed=False)
        return out

    def known(self, pair: tuple[str, str]) -> bool | None:
        """What the training data said about an (item, receptacle) pair (saved with the checkpoint)."""
        return self.knowledge.get(pair)

    def close(self) -> None:
        pass


def outcome(pred: Prediction, progress: int | None) -> tuple[int | None, bool, bool]:
    """(progress after, won, done) of one simulated step from ``progress`` before it.

    Without progress (None: a model or data without a dense score) the model's own ``reward`` and
    ``done`` decide. With it, the predicted progress (unchanged when the delta leaves it out) decides
    the win: the episode is won exactly when it reaches 100, whatever the reward field says (a
    "reward 1" short of 100 is overruled and the episode goes on); a predicted end without reward is
    a loss. An unusable prediction ends the episode as a failure either way.
    """
    delta: StateDelta = pred.effective_delta()
    if not pred.ok:
        return progress, False, True
    if progress is None:
        won = bool(delta.done and delta.reward > 0)
        return None, won, bool(delta.done)
    after = progress if delta.progress is None else delta.progress
    won = after >= 100
    return after, won, bool(won or (delta.done and delta.reward == 0))
