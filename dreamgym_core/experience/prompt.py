"""M_exp's prompt (the conditioning of paper Eq. 4 and Eq. 5): one function builds it for a step.

Eq. 4: (R_t, s_{t+1}, r_{t+1}) ~ M_exp(. | s_t, a_t, H_t, D_k). ``step_prompt`` renders that
conditioning for one step (task, retrieved demonstrations D_k, history window H_t, state s_t, action
a_t) and returns the pointer bindings its output is parsed with. SFT (``sft.sft_examples``),
simulation (``simulator.ExperienceModel.step_batch``) and fidelity (``fidelity.score_transitions``)
all call it, so a prompt seen in training is the prompt seen in use. M_task's prompt is a different
one (a task-writing prompt, ``curriculum.build_task_prompt``), trained into the same weights.

Departures from the paper (and why):
* Side channels. Progress, placements and affordances (below) are inputs beyond the paper's
  (s, a, H_t, D_k), made for TextWorldExpress twc. Each is on only where the env's adapter declares
  it (``envs.base.SideChannels``; ``provided`` switches the rest off and logs why); without them M_exp
  has the paper's inputs, with retrieved demonstrations D_k as the generic grounding.
* Pointer form (``PromptConfig.pointers``, default on): the action's objects are ``@1``/``@2`` in
  the prompt and the target, and object changes are item-level edits resolved by code
  (``exp_format`` "Pointer form"). Held-out games use items never seen in training and a tiny
  model cannot copy unseen multi-token names; with pointers it never has to.
* Progress (``PromptConfig.progress``, default on): the prompt shows the env's dense score before
  the step and M_exp predicts it after; the simulator wins the episode when it reaches 100.
* Placement knowledge (``PromptConfig.placements``, default on): for a put (or a take out of a
  receptacle) the prompt says what the training data knows about that (item, receptacle) pair:
  an exact-key lookup of past experience, next to the paper's embedding retrieval of demonstrations.
  SFT examples see only the other training tasks' evidence; the table is saved with the checkpoint.
* Affordances (``PromptConfig.affordances``, default on): one ``## known`` line per object the
  action names, saying what the state shows it is (``annotate.affordance_hints``); nothing the
  prompt's state does not already hold, but it made rare invalid actions learnable on a CPU.
* Demonstrations are shown compactly (their action and outcome delta, not their state), so k = 2
  demos add about 40 tokens and prompts stay within ``max_len`` (``exp_format.build_prompt``).
* Retrieval is a batched function argument (``Retrieve``: queries -> demos per query), so M_exp
  works with or without the replay buffer and a simulator batch step makes one retrieval call.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Sequence

from dreamgym_core.envs.base import SideChannels
from dreamgym_core.exp_format import action_refs, build_prompt, parse_output, parse_pointer_output
from dreamgym_core.state import AbstractState
from dreamgym_core.state_delta import Prediction, progress_percent


class Query(NamedTuple):
    """What one step retrieves demonstrations for: its task (SFT excludes it) and (state, action)."""

    task_id: str
    state: str
    action: str


Retrieve = Callable[[Sequence[Query], int], list[Sequence[Mapping]]]
"""``retrieve(queries, k)`` -> per query up to k demonstrations, best first: mappings with ``state``,
``action``, ``next_state``, ``valid``, ``reward``, ``done`` (``retrieval.Retriever``). One call per batch."""


@dataclass(frozen=True)
class PromptConfig:
    history_window: int = 4
    num_demos: int = 0
    """Retrieved demonstrations per prompt (0 = no retrieval)."""
    use_cot: bool = True
    """Train and generate the reasoning trace (ablation: False)."""
    use_history: bool = True
    pointers: bool = True
    """Copy-free prompts and targets (``exp_format`` pointer form); False = literal names (ablation)."""
    progress: bool = True
    """Show the env's dense score before the step (``## progress``) and predict it after; the
    simulator wins an episode when it reaches 100. A side channel: off where the adapter does not
    provide it or the data carries no dense score (``provided``)."""
    placements: bool = True
    """For an action that puts an item somewhere (or takes it out of a receptacle), show what the
    training data says about that (item, receptacle) pair (``## known``: belongs / does not belong /
    never seen; ``annotate.placement_evidence``). SFT examples see the evidence of the *other*
    training tasks only, so "never seen" is trained as often as it happens on unseen games. A side
    channel (twc's): off where the adapter does not provide it (``provided``)."""
    affordances: bool = True
    """Also in ``## known``: one line per object the action names saying what the state shows it is
    (carried, closed / open container, surface, loose here, inside Y; ``annotate.affordance_hints``).
    Read off the prompt's own state, so no outcome leaks; it makes rare invalid actions (open a
    non-container, take a carried item, close a shelf) learnable in minutes on a CPU. A side channel
    (twc's vocabulary): off where the adapter does not provide it (``provided``)."""

    @classmethod
    def from_meta(cls, meta: Mapping) -> "PromptConfig":
        """The config a checkpoint's ``dreamgym.json`` records; ``placements`` (added after ``progress``)
        counts as off for a checkpoint that does not record it: it was trained without it (so does
        ``affordances``, added later still). Checkpoints
        from before the progress field (``experience_model`` format 2) do not write its output line
        and must be retrained (the asset's config key changed, so it retrains them)."""
        saved = dict(meta.get("prompt") or {})
        saved.setdefault("progress", False)
        saved.setdefault("placements", False)
        saved.setdefault("affordances", False)
        return cls(**saved)

    def __post_init__(self) -> None:
        if self.history_window < 0 or self.num_demos < 0:
            raise ValueError("PromptConfig: history_window and num_demos must be >= 0")


def _feedback(state: str) -> str:
    try:
        return AbstractState.parse(state).feedback
    except ValueError:
        return ""


def refs_for(state: str, action: str, cfg: PromptConfig) -> tuple[str, ...] | None:
    """The pointer bindings of one step (None in the literal form or for an unparseable state)."""
    if not cfg.pointers:
        return None
    try:
        return action_refs(AbstractState.parse(state), action)
    except ValueError:
        return None


def make_prompt(instruction: str, history: Sequence[tuple[str, str]], state: str, action: str,
                demos: Sequence[Mapping], cfg: PromptConfig, refs: Sequence[str] | None = None,
                progress: int | None = None, hint: str | None = None) -> str:
    return build_prompt(instruction, history, state, action, demos, history_window=cfg.history_window,
                        max_demos=cfg.num_demos, use_history=cfg.use_history and cfg.history_window > 0,
                        use_demos=cfg.num_demos > 0, refs=refs, progress=progress if cfg.progress else None,
                        hints=((hint,) if (hint and cfg.placements) else ()) + _affordances(state, action, cfg))


def _affordances(state: str, action: str, cfg: PromptConfig) -> tuple[str, ...]:
    if not cfg.affordances:
        return ()
    from dreamgym_core.annotate import affordance_hints

    try:
        parsed = AbstractState.parse(state)
    except ValueError:
        return ()
    return affordance_hints(parsed, action_refs(parsed, action))


Knowledge = Mapping[tuple[str, str], bool]
"""(item, receptacle) -> whether the item belongs there, from the training data (``knowledge_of``)."""


def knowledge_of(rows: Sequence[Mapping]) -> dict[tuple[str, str], bool]:
    """What all of ``rows`` say about each (item, receptacle) pair they put to the test."""
    from dreamgym_core.annotate import placement_evidence

    return {pair: bool(right) for pair, (right, _) in placement_evidence(rows).items()}


def knowledge_to_meta(knowledge: Knowledge) -> list[list]:
    return [[x, y, bool(b)] for (x, y), b in sorted(knowledge.items())]


def knowledge_from_meta(meta: Mapping) -> dict[tuple[str, str], bool]:
    """The knowledge a checkpoint's ``dreamgym.json`` carries (empty for a model trained without it)."""
    return {(str(x), str(y)): bool(b) for x, y, b in meta.get("placements") or []}


def _hint(state: str, action: str, known: Callable[[tuple[str, str]], bool | None]) -> str | None:
    from dreamgym_core.annotate import placement_hint, placement_pair

    try:
        pair = placement_pair(AbstractState.parse(state), action)
    except ValueError:
        return None
    return placement_hint(pair, known(pair)) if pair else None


_SIDE_CHANNEL_SWITCHES = ("progress", "placements", "affordances")
_log = logging.getLogger(__name__)


def provided(prompt: PromptConfig, channels: SideChannels, rows: Sequence[Mapping] | None = None, *,
             source: str = "the env's adapter", log: Callable[[str], None] | None = None) -> PromptConfig:
    """``prompt`` with every side-channel switch (progress, placements, affordances) that ``channels``
    (what ``source`` declares, ``envs.side_channels``) does not provide turned off, each with one
    logged line saying why (``log``, default this module's logger at WARNING). With ``rows`` (the
    training transitions) progress and placements also need the data to carry the dense score
    (``has_progress``): an adapter may offer a score that imported logs left out."""
    say = log or _log.warning
    off = {name: f"{source} does not provide it (SideChannels.{name} is off)"
           for name in _SIDE_CHANNEL_SWITCHES if getattr(prompt, name) and not getattr(channels, name)}
    if rows is not None and not has_progress(rows):
        for name in ("progress", "placements"):  # placements are read off the score's rises
            if getattr(prompt, name) and name not in off:
                off[name] = "the training data carries no dense score (has_progress)"
    for name, why in off.items():
        say(f"M_exp prompt: {name} off: {why}")
    return dataclasses.replace(prompt, **{name: False for name in off})


def has_progress(rows: Sequence[Mapping]) -> bool:
    """The rows carry the env's dense score (``score`` and the observation's ``obs.score``); imported
    logs with zeros only, or rows without the observation's score, do not."""
    return any(r.get("score") for r in rows) and all(isinstance(r.get("obs"), Mapping) for r in rows)


def row_progress(r: Mapping, scored: bool) -> tuple[int | None, int | None]:
    """(progress before, progress after) of a transition row in percent; (None, None) unscored."""
    if not scored:
        return None, None
    obs = r.get("obs") if isinstance(r.get("obs"), Mapping) else {}
    before = obs.get("score")
    return progress_percent(0.0 if before is None else float(before)), progress_percent(float(r.get("score") or 0.0))


def parse_for(text: str, state: str, refs: Sequence[str] | None) -> Prediction:
    """Parse M_exp's text for one step: relexicalized against ``state`` when ``refs`` is not None."""
    if refs is None:
        return parse_output(text)
    try:
        current = AbstractState.parse(state)
    except ValueError:
        return Prediction("", None, False, "bad:state")
    return parse_pointer_output(text, current, refs)


def demos_for(retrieve: Retrieve | None, queries: Sequence[Query], cfg: PromptConfig) -> list[Sequence[Mapping]]:
    """D_k of every query in one retrieval call; empty lists when retrieval is off (no retriever or
    ``cfg.num_demos == 0``, the paper's "w/o experience replay")."""
    if retrieve is None or cfg.num_demos == 0 or not queries:
        return [[] for _ in queries]
    found = retrieve(list(queries), cfg.num_demos)
    if len(found) != len(queries):
        raise ValueError(f"retrieve returned {len(found)} demo lists for {len(queries)} queries")
    return [list(d)[:cfg.num_demos] for d in found]


def step_prompt(instruction: str, history: Sequence[tuple[str, str]], state: str, action: str, cfg: PromptConfig, *,
                demos: Sequence[Mapping] = (), progress: int | None = None,
                known: Callable[[tuple[str, str]], bool | None] | None = None) -> tuple[str, tuple[str, ...] | None]:
    """The M_exp prompt of one step and its pointer bindings (None in the literal form): THE prompt
    of Eq. 4 / Eq. 5, used by SFT, simulation and fidelity alike.

    ``demos``: D_k (shown only when ``cfg.num_demos > 0``); ``progress``: the dense score before the
    step in percent; ``known``: (item, receptacle) -> belongs? from the training data (placements).
    """
    refs = refs_for(state, action, cfg)
    hint = _hint(state, action, known) if (cfg.placements and known is not None) else None
    return make_prompt(instruction, history, state, action, demos if cfg.num_demos else (), cfg, refs, progress,
                       hint), refs
