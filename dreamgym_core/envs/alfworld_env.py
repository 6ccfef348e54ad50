"""ALFWorld adapter: the paper's household environment, on games generated locally (``alfworld_gen``).

ALFWorld (Shridhar et al. 2021) is one of DreamGym's three benchmarks (paper §5). Each game is
played by the unmodified ALFWorld engine: TextWorld's PDDL environment with ALFWorld's demangler
(object names such as "mug 2") and its handcoded expert, on ``game.tw-pddl`` files written by
``alfworld_gen`` from the package's shipped domain, grammar, floor plans and goal templates.

Tasks: ``game`` = "all" (the six task types in turn) or one task type name; ``Task.seed`` is the
generator's index within the split. Held-out tasks (dev, test) are on unseen floor plans, or with
settings ``{"heldout": "pairs"}`` on seen floor plans with unseen (object, receptacle) goal
pairings (the generator's dev_pairs / test_pairs; see ``alfworld_gen``).

Abstract state (paper §4.5), built from the engine's facts, restricted to what the agent sees:
    location   the receptacle the agent stands at ("countertop 1"), "middle of room" at the start
    objects    that receptacle: "fridge 1 (closed)", "fridge 1 (open): apple 1, egg 2",
               "countertop 1: empty"; the contents of a closed receptacle are not shown
    exits      every receptacle of the room (the "go to" targets), fixed per game
    inventory  what the agent holds, with the state the task cares about: "mug 1 (cool)"
Status marks (hot, cool, clean, on) come from the engine's facts; ALFWorld's text says them only
in the feedback of the step that changed them.

Reward: outcome reward 1.0 on the step the goal holds, else 0.0 (ALFWorld is sparse; ``score`` is
0/1 too). Validity: an action is valid iff it was among the admissible commands of its state.
Candidates: the admissible commands (minus "help"). Expert: ALFWorld's handcoded expert (it explores
like an agent: opens receptacles until it sees the object), played once per game at its first reset
and cached beside the game as a fixed path (``expert.json``); where it fails (a third of the games,
mostly pick-two), FastDownward's optimal plan from the start state, which knows every placement.

Speed (measured, docs/environments.md): about 0.1-0.5 s per step and 1-3 s per reset, since the
engine lists and verbalises every admissible command at every step and FastDownward translates
the problem at each reset. Fast Downward's translator rewrites ``sys.argv``; the adapter restores it.

Departures from ALFWorld: see ``alfworld_gen`` (object placement is ours, not ALFRED's).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import OrderedDict
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

from dreamgym_core.envs._deadline import deadline, failure
from dreamgym_core.envs.alfworld_gen import TASK_TYPES, ensure_game, load_spec
from dreamgym_core.envs.base import EnvCrash, Observation, SideChannels, StepResult
from dreamgym_core.schema import RawObs, Task
from dreamgym_core.state import AbstractState, clean_text

GAMES = ("all", *TASK_TYPES)
SETTINGS = {"max_object_types": 8, "heldout": "layouts"}
"""Settings (``EnvSpec.params`` JSON) and their defaults: object types per room; what dev/test hold out."""
EXPERT_MAX_STEPS = 50
"""ALFWorld's own episode limit; the expert's path is cut there (or when it is lost)."""
CENTER = "middle of room"
_MARKS = (("ishot", "hot"), ("iscool", "cool"), ("isclean", "clean"), ("ison", "on"))
_ARRIVE = re.compile(r"^You arrive at (.+?)\. ")


@contextmanager
def _keep_argv():
    argv = list(sys.argv)
    try:
        yield
    finally:
        sys.argv[:] = argv


def memoize_text_parsers() -> None:
    """Speed patches on TextWorld's PDDL engine, applied once: 9x faster steps, resets of a game
    played before without FastDownward (tests/test_alfworld_env.py checks the outputs unchanged).

    Cache TextWorld's parses of grammar and query strings.

    The PDDL env verbalises every admissible command at every step and re-parses the same few
    hundred grammar strings with tatsu each time (profiled: half of a step's time). The parsed
    symbols are mutated during derivation, so each call gets a deep copy of the cached parse;
    the parse itself is a pure function of (text, rule name).
    """
    import textworld.envs.pddl.textgen as textgen
    import textworld.logic as logic

    for module in (textgen, logic):
        if getattr(module, "_dreamgym_memoized", False):
            continue
        parse, cache = module._parse_and_convert, {}

        def cached(text, rule_name=None, trace=False, _parse=parse, _cache=cache):
            key = (text, rule_name)
            if key not in _cache:
                _cache[key] = _parse(text, rule_name=rule_name)
            return deepcopy(_cache[key])

        module._parse_and_convert = cached
        module._dreamgym_memoized = True
    if not getattr(textgen.copy_context, "_dreamgym", False):
        # Each derivation step deep-copied its variables and mapping (entity infos, logic variables),
        # which derivation only reads or extends with new keys: copying the dicts is enough.
        def copy_context(context):
            return {**context, "variables": dict(context["variables"]), "mapping": dict(context["mapping"])}

        copy_context._dreamgym = True
        textgen.copy_context = copy_context
    import fast_downward

    if not getattr(fast_downward.pddl2sas, "_dreamgym", False):
        # Every reset re-translates the same PDDL problem twice (1-2 s each); the translation is a
        # function of its text, so a reset of a game played before reuses it (the last 64 games).
        translate, memo = fast_downward.pddl2sas, OrderedDict()

        def pddl2sas(domain, problem, verbose=False, optimize=False):
            key = (hash(domain), problem, optimize)
            if key not in memo:
                memo[key] = translate(domain, problem, verbose=verbose, optimize=optimize)
                if len(memo) > 128:
                    memo.popitem(last=False)
            memo.move_to_end(key)
            return memo[key]

        pddl2sas._dreamgym = True
        fast_downward.pddl2sas = pddl2sas


def _name(var) -> str:
    return var.name.strip()


def abstract_state(feedback: str, facts) -> str:
    """Engine facts (demangled names) + the step's feedback -> the abstract state text."""
    at: str | None = None
    recep_at: dict[str, str] = {}
    openable, opened, held = set(), set(), []
    contents: dict[str, list[str]] = {}
    marks: dict[str, list[str]] = {}
    for f in facts:
        args = [_name(a) for a in f.arguments]
        match f.name:
            case "atlocation":
                at = args[1]
            case "receptacleatlocation":
                recep_at[args[1]] = args[0]
            case "openable":
                openable.add(args[0])
            case "opened":
                opened.add(args[0])
            case "holds":
                held.append(args[1])
            case "inreceptacle":
                contents.setdefault(args[1], []).append(args[0])
            case _:
                for pred, word in _MARKS:
                    if f.name == pred:
                        marks.setdefault(args[0], []).append(word)

    def show(obj: str) -> str:
        return f"{obj} ({', '.join(sorted(marks[obj]))})" if obj in marks else obj

    here = recep_at.get(at or "", "")
    objects = []
    if here:
        items = ", ".join(sorted(show(o) for o in contents.get(here, []) if o not in held)) or "empty"
        if here in openable:
            objects.append(f"{here} (open): {items}" if here in opened else f"{here} (closed)")
        else:
            objects.append(f"{here}: {items}")
    return AbstractState.make(canonical_feedback(feedback), here or CENTER, objects, sorted(recep_at.values()),
                              [show(o) for o in held]).render()


def canonical_feedback(feedback: str) -> str:
    """One line: the intro's banner and room list become "You are in the middle of a room."."""
    text = (feedback or "").strip()
    if text.startswith("-= Welcome to TextWorld, ALFRED! =-"):
        return "You are in the middle of a room."
    if text.startswith("You are carrying") or text.startswith("You are not carrying"):
        return "You check your inventory."
    return clean_text(text)


def propose_candidates(state_text: str) -> list[str]:
    """ALFWorld's command templates over an abstract state's entities (for synthetic states).

    Its recall against the admissible commands is measured in tests/test_alfworld_env.py.
    """
    try:
        s = AbstractState.parse(state_text)
    except ValueError:
        return ["look", "inventory"]
    cands = ["look", "inventory"]
    here = s.location if s.location != CENTER else ""
    cands += [f"go to {r}" for r in s.exits if r != here]
    held = [re.sub(r" \(.*\)$", "", i) for i in s.inventory]
    contents: list[str] = []
    for fact in s.objects:
        head, _, items = fact.partition(": ")
        name = re.sub(r" \((?:open|closed)\)$", "", head)
        cands.append(f"examine {name}")
        for obj in held:  # appliances work closed or open
            for verb, appliance in (("heat", "microwave"), ("cool", "fridge"), ("clean", "sinkbasin")):
                if name.startswith(appliance + " "):
                    cands.append(f"{verb} {obj} with {name}")
        if head.endswith("(closed)"):
            cands.append(f"open {name}")
            continue
        if head.endswith("(open)"):
            cands.append(f"close {name}")
        if items and items != "empty":
            contents += [re.sub(r" \(.*\)$", "", c) for c in items.split(", ")]
        for obj in contents:
            if obj.startswith(("desklamp", "floorlamp")):
                cands.append(f"use {obj}")
            elif not held:
                cands.append(f"take {obj} from {name}")
        cands += [f"move {obj} to {name}" for obj in held]
    cands += [f"examine {o}" for o in held]
    return sorted(dict.fromkeys(cands))


class ALFWorldEnv:
    """One ALFWorld engine (TextWorld PddlEnv + ALFWorld wrappers) reused across games."""

    name = "alfworld"

    @classmethod
    def side_channels(cls, game: str) -> SideChannels:
        """The state-only candidate rule only. Its score is 0/1 (no progress); where an item goes is
        the task's goal, not a fixed fact of the game (no placement lookup); its facts look like
        twc's, but the affordance hints and the rule traces' item counting were written and measured
        for twc, not here."""
        return SideChannels(candidate_rule=True)

    def __init__(self, game: str = "all", settings: dict | None = None, cache_dir: str = "data/cache",
                 step_limit: int = 50, step_timeout_s: float = 60.0):
        if game not in GAMES:
            raise ValueError(f"unknown ALFWorld game {game!r}; choose one of {', '.join(GAMES)}")
        settings = dict(settings or {})
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ValueError(f"ALFWorld settings: unknown key(s) {unknown}; known: {sorted(SETTINGS)}")
        if settings.get("heldout", "layouts") not in ("layouts", "pairs"):
            raise ValueError(f"ALFWorld settings: heldout must be 'layouts' or 'pairs', got {settings['heldout']!r}")
        self.game = game
        self.params = json.dumps(settings, sort_keys=True) if settings else ""
        self.cache_dir = str(cache_dir)
        self.step_limit = step_limit
        self.step_timeout_s = step_timeout_s
        self._env = None
        self._loaded = ""
        self._admissible: tuple[str, ...] = ()
        self._gold: list[str] = []
        self._steps = 0
        self._won = False
        self._task_id = ""

    # ---- tasks and games

    def _index(self, i: int) -> int:
        """Generator index of the i-th task: every index for "all", one task type's indices otherwise."""
        return i if self.game == "all" else i * len(TASK_TYPES) + TASK_TYPES.index(self.game)

    @staticmethod
    def generator_split(split: str, settings: dict) -> str:
        """Task split -> generator split: dev/test become dev_pairs/test_pairs with heldout="pairs"."""
        return f"{split}_pairs" if split != "train" and settings.get("heldout") == "pairs" else split

    def game_folder(self, task: Task) -> Path:
        settings = {**SETTINGS, **(json.loads(task.params) if task.params else {})}
        return ensure_game(self.cache_dir, self.generator_split(task.split, settings), task.seed,
                           int(settings["max_object_types"]))

    def tasks(self, split: str, n: int, start: int = 0) -> list[Task]:
        """``n`` generated games of a split (written to the cache on first use, milliseconds each)."""
        if split not in ("train", "dev", "test"):
            raise ValueError(f"ALFWorld split must be train, dev or test, got {split!r}")
        gen_split = self.generator_split(split, json.loads(self.params) if self.params else {})
        out = []
        for i in range(start, start + n):
            idx = self._index(i)
            task = Task(task_id=f"alfworld/{gen_split}/{idx}", env=self.name, game=self.game, split=split,
                        seed=idx, instruction="", params=self.params)
            spec = load_spec(self.game_folder(task))
            out.append(Task(task_id=task.task_id, env=self.name, game=self.game, split=split, seed=idx,
                            instruction=spec.instruction, params=self.params))
        return out

    # ---- engine

    def _engine(self):
        import textworld
        from alfworld.agents.environment.alfred_tw_env import (AlfredDemangler, AlfredExpert, AlfredExpertType,
                                                               AlfredInfos)
        from textworld.envs.pddl.pddl import PddlEnv

        memoize_text_parsers()
        infos = textworld.EnvInfos(won=True, admissible_commands=True, facts=True, extras=["expert_plan"])
        return AlfredExpert(AlfredInfos(AlfredDemangler(PddlEnv(infos), shuffle=False)), AlfredExpertType.HANDCODED)

    def _reset_engine(self, path: str):
        with deadline(self.step_timeout_s), _keep_argv():
            if self._env is None:
                self._env = self._engine()
            if self._loaded != path:
                self._env.load(path)
                self._loaded = path
            return self._env.reset()

    def _expert_path(self, folder: Path, path: str, first) -> list[str]:
        """The handcoded expert's actions from the start, played once and cached in ``expert.json``."""
        cached = folder / "expert.json"
        if cached.is_file():
            return json.loads(cached.read_text())["actions"]
        st, actions, idle = first, [], 0
        with deadline(self.step_timeout_s * 4), _keep_argv():
            while not st["won"] and len(actions) < min(self.step_limit, EXPERT_MAX_STEPS) and idle < 3:
                action = (st.get("extra.expert_plan") or ["look"])[0]
                st, _, _ = self._env.step(action)
                actions.append(action)
                # the expert answers "look" when its own next command is not admissible: it is lost
                idle = idle + 1 if action in ("look", "help", "inventory") and len(actions) > 1 else 0
        won, expert = bool(st["won"]), "handcoded"
        if not won:
            # The handcoded expert loses its way in some generated games (stale memory of where it saw
            # an object, mostly in pick-two tasks): fall back to FastDownward's optimal plan, which
            # knows every placement (so it never explores) and solved every generated game we tried.
            with deadline(self.step_timeout_s * 4), _keep_argv():
                self._env.reset()
                pddl = self._env
                while hasattr(pddl, "_wrapped_env"):
                    pddl = pddl._wrapped_env
                plan = list(pddl._pddl_state.replan(pddl._entity_infos) or [])
                for action in plan:
                    st, _, _ = self._env.step(action)
            if st["won"]:
                actions, won, expert = plan, True, "planner"
            else:
                actions = actions[:len(actions) - idle]  # drop the trailing idle moves
        tmp = folder / f".expert-{time.monotonic_ns()}"
        tmp.write_text(json.dumps({"actions": actions, "won": won, "expert": expert}))
        tmp.replace(cached)
        return actions

    def _observation(self, st) -> Observation:
        admissible = tuple(sorted(st["admissible_commands"] or ()))
        self._admissible = admissible
        cands = tuple(c for c in admissible if c != "help")
        raw = RawObs(feedback=st["feedback"], look="", inventory="", candidates=cands,
                     score=1.0 if st["won"] else 0.0)
        return Observation(state=abstract_state(st["feedback"], st["facts"]), candidates=cands, raw=raw)

    def reset(self, task: Task) -> Observation:
        try:
            folder = self.game_folder(task)
        except Exception as exc:
            raise EnvCrash(f"ALFWorld could not generate {task.task_id}: {type(exc).__name__}: {exc}") from exc
        path = str(folder / "game.tw-pddl")
        started = time.monotonic()
        try:
            st = self._reset_engine(path)
            if not (folder / "expert.json").is_file():
                self._gold = self._expert_path(folder, path, st)
                st = self._reset_engine(path)
            else:
                self._gold = json.loads((folder / "expert.json").read_text())["actions"]
        except Exception as exc:
            self._drop_engine()
            raise EnvCrash(f"ALFWorld reset failed for {task.task_id}: "
                           f"{failure(exc, started, self.step_timeout_s)}") from exc
        self._steps, self._won, self._task_id = 0, False, task.task_id
        return self._observation(st)

    def step(self, action: str) -> StepResult:
        if self._env is None:
            raise EnvCrash("ALFWorld step before reset (or after a crash)")
        valid = action in self._admissible
        started = time.monotonic()
        try:
            with deadline(self.step_timeout_s), _keep_argv():
                st, _, done = self._env.step(action)
        except Exception as exc:
            self._drop_engine()
            raise EnvCrash(f"ALFWorld step {action!r} failed in {self._task_id}: "
                           f"{failure(exc, started, self.step_timeout_s)}") from exc
        self._steps += 1
        won = bool(st["won"])
        reward = 1.0 if won and not self._won else 0.0
        self._won = self._won or won
        obs = self._observation(st)
        return StepResult(obs=obs, reward=reward, score=obs.raw.score,
                          done=bool(done or won or self._steps >= self.step_limit), won=won, lost=False, valid=valid)

    def expert_actions(self) -> list[str]:
        return list(self._gold)

    def expert_info(self, task: Task) -> dict:
        """{"actions", "won", "expert": "handcoded" | "planner"} of a game already reset once."""
        return json.loads((self.game_folder(task) / "expert.json").read_text())

    def propose_candidates(self, state: str) -> list[str]:
        return propose_candidates(state)

    def _drop_engine(self) -> None:
        env, self._env, self._loaded = self._env, None, ""
        if env is not None:
            try:
                env.close()
            except Exception:
                pass

    def close(self) -> None:
        self._drop_engine()
