"""TextWorld adapter: games of the tw-simple, tw-cooking, tw-coin_collector and tw-treasure_hunter
challenges (any registered challenge works), generated in-process and cached on disk.

TextWorld (Côté et al. 2018) compiles each generated game to a .z8 story played by the Jericho
z-machine; its state tracker gives the admissible commands, the walkthrough and the score. A game
is fully determined by (challenge, settings, seed), so that triple (plus the TextWorld version)
keys an on-disk cache and a second run reuses the compiled story instead of regenerating it
(2-6 s per game here; tw-treasure_hunter level 30 took 2 minutes). Regenerating in another
process gives the same game to play, though not always the same bytes (TextWorld orders some
internal sets by Python's string hash).

Splits: disjoint seed ranges (train 0-9999, dev 10000-19999, test 20000-29999). Challenges with
their own distribution split also get it: tw-cooking ``split`` = train / valid / test (unseen
foods and preparations), tw-simple ``test`` for the test split.

Abstract state (paper §4.5): parsed from the game's text against the game's own lexicon, in
``textworld_state`` (``abstract_state``).

Reward: outcome reward 1.0 on the step the game is won, else 0.0 (paper §4.1). ``score`` is the
game's score over its max_score. Validity: an action is valid iff it was among the admissible
commands of the state it was taken in. Expert: the game's walkthrough.

Failures: generation and engine errors raise ``EnvCrash``; a step or reset that runs past
``step_timeout_s`` is interrupted by SIGALRM (main thread only) and also becomes ``EnvCrash``,
after which the next reset starts a fresh engine. A hang inside the z-machine's C code cannot be
interrupted before it returns to Python.

Departures from the paper: none in the protocol; the paper does not use TextWorld (its WebShop,
ALFWorld and WebArena do not run offline here), TextWorld stands in for ALFWorld's engine family.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from dataclasses import replace
from pathlib import Path

from dreamgym_core.envs._deadline import deadline, failure
from dreamgym_core.envs.base import EnvCrash, Observation, SideChannels, StepResult
from dreamgym_core.envs.textworld_state import Lexicon, abstract_state
from dreamgym_core.schema import RawObs, Task
from dreamgym_core.state import AbstractState

CHALLENGES = ("tw-simple", "tw-cooking", "tw-coin_collector", "tw-treasure_hunter")
DEFAULT_SETTINGS = {
    "tw-simple": {"rewards": "dense", "goal": "detailed"},
    "tw-cooking": {"recipe": 1, "take": 1, "go": 1, "open": True},
    "tw-coin_collector": {"level": 5},
    "tw-treasure_hunter": {"level": 5},
}
"""Small games by default; any challenge option can be overridden through ``settings``."""
SPLIT_SEEDS = {"train": 0, "dev": 10_000, "test": 20_000}
SEEDS_PER_SPLIT = 10_000
_SPLIT_KEYS = {"tw-cooking": "split", "tw-simple": "test"}


# --------------------------------------------------------------------------------------------
# Settings, seeds and the game cache


def challenge_settings(challenge: str, settings: dict) -> dict:
    """Every option the challenge reads: its argparse defaults < ours < the user's."""
    from textworld.challenges import CHALLENGES as REGISTRY

    if challenge not in REGISTRY:
        raise ValueError(f"unknown TextWorld challenge {challenge!r}; choose one of {', '.join(sorted(REGISTRY))}")
    parser = argparse.ArgumentParser(add_help=False)
    REGISTRY[challenge][2](parser)
    known = {a.dest: a.default for a in parser._actions}
    split_key = _SPLIT_KEYS.get(challenge)
    if split_key and split_key in settings:
        raise ValueError(f"{challenge}: {split_key!r} is set from each task's split (train/dev/test); "
                         "remove it from the settings")
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"{challenge}: unknown setting(s) {unknown}; known: {sorted(set(known) - {split_key})}")
    return {**known, **DEFAULT_SETTINGS.get(challenge, {}), **settings}


def split_seeds(split: str, n: int, start: int = 0) -> range:
    """Game seeds of a split: disjoint fixed ranges, so a seed never appears in two splits."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {tuple(SPLIT_SEEDS)}, got {split!r}")
    if start < 0 or n < 0 or start + n > SEEDS_PER_SPLIT:
        raise ValueError(f"a TextWorld split has {SEEDS_PER_SPLIT} seeds; asked for {start}+{n}")
    return range(SPLIT_SEEDS[split] + start, SPLIT_SEEDS[split] + start + n)


def split_option(challenge: str, split: str) -> dict:
    """The challenge's own train/valid/test distribution option for a task split, if it has one."""
    match challenge:
        case "tw-cooking":
            return {"split": {"train": "train", "dev": "valid", "test": "test"}[split]}
        case "tw-simple":
            return {"test": split == "test"}
    return {}


def game_dir(cache_dir: str | Path, challenge: str, settings: dict, seed: int) -> Path:
    """Cache folder of one game; the key covers everything that shapes it."""
    import textworld

    key = json.dumps({"challenge": challenge, "settings": settings, "textworld": textworld.__version__},
                     sort_keys=True)
    return Path(cache_dir) / "textworld" / challenge / hashlib.sha1(key.encode()).hexdigest()[:16] / str(seed)


def ensure_game(cache_dir: str | Path, challenge: str, settings: dict, seed: int) -> Path:
    """Path of the compiled game, generating it (in-process) on a cache miss.

    Generation writes into a private temporary folder that is renamed into place, so concurrent
    workers never see a half-written game; the loser of a race discards its copy.
    """
    folder = game_dir(cache_dir, challenge, settings, seed)
    if (folder / "game.z8").is_file():
        return folder
    import textworld
    from textworld.challenges import CHALLENGES as REGISTRY

    tmp = folder.parent / f".tmp-{seed}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        options = textworld.GameOptions()
        options.seeds = seed
        options.path = str(tmp / "game.z8")
        options.force_recompile = True
        game = REGISTRY[challenge][1](settings=dict(settings), options=options)
        textworld.generator.compile_game(game, options)
        meta = {"challenge": challenge, "settings": settings, "seed": seed, "objective": game.objective}
        (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "game.z8").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------------------------
# Candidate actions from an abstract state (for synthetic states; real states use the env's list)

COOKING_ADJECTIVES = frozenset({"raw", "sliced", "diced", "chopped", "fried", "roasted", "grilled", "burned",
                                "cooked", "uncut"})
COOKERS = ("oven", "stove", "bbq", "toaster")
_COOKING_TOOLS = ("knife", "cookbook")


def _base_name(printed: str) -> str:
    """'sliced roasted carrot' -> 'carrot': commands name entities without their cooking state."""
    words = printed.split()
    while len(words) > 1 and words[0].lower() in COOKING_ADJECTIVES:
        words = words[1:]
    return " ".join(words)


def propose_candidates(state_text: str, challenge: str = "tw-simple") -> list[str]:
    """TextWorld's command templates instantiated with the entities of an abstract state.

    Verbs x entities as TextWorld's grammar writes them (take X from Y, put X on Y, insert X into Y,
    unlock X with K, cook X with Y, slice X with knife...). Its recall and precision against the
    admissible commands are measured in tests/test_textworld_env.py.
    """
    try:
        s = AbstractState.parse(state_text)
    except ValueError:
        return ["look", "inventory"]
    cands = ["look", "inventory"]
    inventory = [_base_name(i) for i in s.inventory]
    keys = [i for i in inventory if "key" in i]
    supporters, containers, present, doors = [], [], [], []
    for fact in s.objects:
        head, has_colon, contents = fact.partition(": ")
        m = re.fullmatch(r"(.+?) \((open|closed|locked)\)", head)
        name, state = (m.group(1), m.group(2)) if m else (head, "")
        present.append(name)
        if state in ("closed", "locked"):
            cands.append(f"open {name}")
            cands += [f"{verb} {name} with {k}" for k in keys for verb in ("unlock", "lock")]
        elif state == "open":
            cands.append(f"close {name}")
            cands += [f"lock {name} with {k}" for k in keys]
            containers.append(name)
        elif has_colon:
            supporters.append(name)
        else:
            cands.append(f"take {_base_name(name)}")
        if contents and contents != "empty" and state in ("", "open"):
            for item in contents.split(", "):
                present.append(item)
                cands.append(f"take {_base_name(item)} from {name}")
    for ex in s.exits:
        direction, _, door = ex.partition(": ")
        m = re.fullmatch(r"(.+?) \((open|closed|locked)\)", door)
        if not m:
            cands.append(f"go {direction}")
            continue
        present.append(m.group(1))
        doors.append(m.group(1))
        if m.group(2) == "open":
            cands += [f"go {direction}", f"close {m.group(1)}"]
        else:
            cands.append(f"open {m.group(1)}")
            cands += [f"{verb} {m.group(1)} with {k}" for k in keys for verb in ("unlock", "lock")]
    cooking = challenge == "tw-cooking"
    food = [i for i in inventory if not (cooking and i in _COOKING_TOOLS)]
    for item in inventory:
        cands.append(f"drop {item}")
        cands += [f"put {item} on {sup}" for sup in supporters]
        cands += [f"insert {item} into {c}" for c in containers]
    cands += [f"eat {f}" for f in food]
    # Cooking games offer "examine" for neither doors nor carried things.
    seen = [x for x in present if x not in doors] if cooking else present + list(s.inventory)
    cands += [f"examine {_base_name(x)}" for x in seen]
    if cooking:
        cookers = [n for n in present if n.lower() in COOKERS]
        cands += [f"cook {f} with {c}" for f in food for c in cookers]
        if "knife" in inventory:
            cands += [f"{verb} {f} with knife" for f in food for verb in ("slice", "dice", "chop")]
        if s.location == "kitchen" and food:
            cands.append("prepare meal")
    return sorted(dict.fromkeys(cands))


# --------------------------------------------------------------------------------------------
# The adapter


def _request_infos():
    from textworld import EnvInfos

    return EnvInfos(description=True, inventory=True, admissible_commands=True, objective=True, won=True,
                    lost=True, score=True, max_score=True, extras=["walkthrough"])


class TextWorldEnv:
    """One TextWorld engine (a Jericho z-machine plus TextWorld's state tracker) reused across games."""

    name = "textworld"

    @classmethod
    def side_channels(cls, game: str) -> SideChannels:
        """The game's points over its max score (progress) and the state-only candidate rule; twc's
        placement, affordance and item-counting readings were not made for these quests."""
        return SideChannels(progress=True, candidate_rule=True)

    def __init__(self, challenge: str, settings: dict, cache_dir: str, step_limit: int = 100,
                 step_timeout_s: float = 30.0):
        self.challenge = challenge
        self.settings = challenge_settings(challenge, dict(settings or {}))
        self.params = json.dumps(self.settings, sort_keys=True)
        self.cache_dir = str(cache_dir)
        self.step_limit = step_limit
        self.step_timeout_s = step_timeout_s
        self._env = None
        self._loaded = ""
        self._lexicon = Lexicon({}, {})
        self._admissible: tuple[str, ...] = ()
        self._gold: list[str] = []
        self._max_score = 1
        self._steps = 0
        self._won = False
        self._task_id = ""

    def game_folder(self, task: Task) -> Path:
        """The task's cached game (game.z8, game.json, meta.json), generated on first use."""
        settings = json.loads(task.params) if task.params else self.settings
        settings = {**settings, **split_option(task.game, task.split)}
        return ensure_game(self.cache_dir, task.game, settings, task.seed)

    def tasks(self, split: str, n: int, start: int = 0) -> list[Task]:
        """Generates (or reuses from the cache) the ``n`` games; the objective is each task's instruction."""
        out = []
        for seed in split_seeds(split, n, start):
            task = Task(task_id=f"textworld/{self.challenge}/{split}/{seed}", env=self.name, game=self.challenge,
                        split=split, seed=seed, instruction="", params=self.params)
            meta = json.loads((self.game_folder(task) / "meta.json").read_text())
            out.append(replace(task, instruction=meta["objective"]))
        return out

    def _observation(self, st) -> Observation:
        self._admissible = tuple(sorted(st["admissible_commands"] or ()))
        visible = {c[len("examine "):] for c in self._admissible if c.startswith("examine ")}
        score = float(st["score"] or 0) / self._max_score
        raw = RawObs(feedback=st["feedback"], look=st["description"], inventory=st["inventory"],
                     candidates=self._admissible, score=score)
        state = abstract_state(st["feedback"], st["description"], st["inventory"], self._lexicon, visible)
        return Observation(state=state, candidates=self._admissible, raw=raw)

    def reset(self, task: Task) -> Observation:
        try:
            folder = self.game_folder(task)
        except Exception as exc:  # generation failed: unknown option, impossible quest, compiler error...
            raise EnvCrash(f"TextWorld could not generate {task.task_id}: {type(exc).__name__}: {exc}") from exc
        path = str(folder / "game.z8")
        started = time.monotonic()
        try:
            with deadline(self.step_timeout_s), warnings.catch_warnings():
                # Jericho warns that TextWorld stories are "not fully supported": it cannot read their
                # score itself, but TextWorld's wrappers do, so the warning says nothing useful here.
                warnings.filterwarnings("ignore", message=r"Game .* is not fully supported")
                if self._env is None:
                    import textworld

                    self._env = textworld.start(path, _request_infos())
                elif self._loaded != path:
                    self._env.load(path)
                self._loaded = path
                st = self._env.reset()
        except Exception as exc:
            self._drop_engine()
            raise EnvCrash(f"TextWorld reset failed for {task.task_id}: "
                           f"{failure(exc, started, self.step_timeout_s)}") from exc
        self._lexicon = Lexicon.from_game(st["game"])
        self._max_score = max(int(st["max_score"] or 0), 1)
        self._gold = list(st.get("extra.walkthrough") or [])
        self._steps, self._won = 0, False
        self._task_id = task.task_id
        return self._observation(st)

    def step(self, action: str) -> StepResult:
        if self._env is None:
            raise EnvCrash("TextWorld step before reset (or after a crash)")
        valid = action in self._admissible
        started = time.monotonic()
        try:
            with deadline(self.step_timeout_s):
                st, _, done = self._env.step(action)
        except Exception as exc:
            self._drop_engine()
            raise EnvCrash(f"TextWorld step {action!r} failed in {self._task_id}: "
                           f"{failure(exc, started, self.step_timeout_s)}") from exc
        self._steps += 1
        won, lost = bool(st["won"]), bool(st["lost"])
        reward = 1.0 if won and not self._won else 0.0
        self._won = self._won or won
        obs = self._observation(st)
        return StepResult(obs=obs, reward=reward, score=obs.raw.score,
                          done=bool(done or won or lost or self._steps >= self.step_limit),
                          won=won, lost=lost, valid=valid)

    def expert_actions(self) -> list[str]:
        return list(self._gold)

    def propose_candidates(self, state: str) -> list[str]:
        return propose_candidates(state, self.challenge)

    def _drop_engine(self) -> None:
        """After a failure the engine's state is unknown: the next reset starts a fresh one."""
        env, self._env, self._loaded = self._env, None, ""
        if env is not None:
            try:
                env.close()
            except Exception:
                pass

    def close(self) -> None:
        self._drop_engine()
