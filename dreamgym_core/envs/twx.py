"""TextWorldExpress adapter (twc, cookingworld, and any TWX game by name with parameters).

TextWorldExpress (Jansen & Côté 2022) is a fast Java re-implementation of TextWorld-style games;
``twc`` (TextWorld Commonsense: put household objects in their usual places) is the embedded
default because it is ALFWorld-like and steps in about a millisecond.

Abstract state: the look text is parsed into canonical facts (filler phrases such as "In one part
of the room you see" removed, articles dropped, lists sorted); see ``parse_look``. Anything the
parser does not recognise is kept verbatim as a fact, so it never loses information.

Reward: outcome reward 1.0 on the step where ``tasksuccess`` turns true, else 0.0 (paper §4.1).
TWX's own normalised score (partial credit per sub-goal) is kept in ``score``.
Validity: an action is valid iff the env listed it among ``validActions`` at that state.
"""

from __future__ import annotations

import re
import time

from dreamgym_core.envs._deadline import deadline, failure
from dreamgym_core.envs.base import EnvCrash, Observation, SideChannels, StepResult
from dreamgym_core.schema import RawObs, Task
from dreamgym_core.state import AbstractState, clean_text

DEFAULT_PARAMS = {
    "twc": "numLocations=1,numItemsToPutAway=2,includeDoors=0,limitInventorySize=0",
    "cookingworld": "numLocations=1,numIngredients=2,numDistractorItems=2,includeDoors=0,limitInventorySize=0",
    "coin": "numLocations=3,numDistractorItems=0,includeDoors=0,limitInventorySize=0",
}
GAMES = ("cookingworld", "twc", "coin", "mapreader", "arithmetic", "sorting", "simonsays", "peckingorder")
_FOLD = {"train": "train", "dev": "dev", "test": "test"}

_FILLERS = re.compile(
    r"^(?:in one part of the room you see|in another part of the room you see|there is also|"
    r"you also see|you see)\s+", re.I)
_ARTICLE = re.compile(r"^(?:a|an|some|the)\s+", re.I)
_ROOM = re.compile(r"^You are in the ([^.]+)\.\s*")


def _strip_article(s: str) -> str:
    return _ARTICLE.sub("", s.strip()).strip()


def _items(text: str) -> list[str]:
    """'an used tissue, and a rotten banana' -> ['used tissue', 'rotten banana']."""
    out = []
    for part in re.split(r",\s*", text):
        part = re.sub(r"^and\s+", "", part.strip())
        if part:
            out.append(_strip_article(part))
    return out


def _object_fact(phrase: str) -> str:
    p = _strip_article(phrase.strip().rstrip("."))
    opened = False
    if p.lower().startswith("open "):
        opened, p = True, p[5:]
    if m := re.fullmatch(r"(.+?),? that is closed", p):
        return f"{m[1]} (closed)"
    if m := re.fullmatch(r"(.+?),? that is empty", p):
        return f"{m[1]} (open): empty" if opened else f"{m[1]}: empty"
    if m := re.fullmatch(r"(.+?),? that contains (.+)", p):
        return f"{m[1]} (open): {', '.join(sorted(_items(m[2])))}"
    if m := re.fullmatch(r"(.+?),? that has nothing on it", p):
        return f"{m[1]}: empty"
    if m := re.fullmatch(r"(.+?),? that has (.+?) on it", p):
        return f"{m[1]}: {', '.join(sorted(_items(m[2])))}"
    return f"{p} (open)" if opened else p


def _exit_fact(line: str) -> str:
    line = line.strip().rstrip(".").strip()
    if m := re.fullmatch(r"Through an? open (.+?), to the (\w+) you see (?:the )?(.+)", line, re.I):
        return f"{m[2].lower()}: {m[3]} (open {m[1]})"
    if m := re.fullmatch(r"To the (\w+) you see an? closed (.+)", line, re.I):
        return f"{m[1].lower()}: closed {m[2]}"
    if m := re.fullmatch(r"To the (\w+) you see (?:the )?(.+)", line, re.I):
        return f"{m[1].lower()}: {m[2]}"
    return line


def parse_look(look: str) -> tuple[str, list[str], list[str]]:
    """Look text -> (location, object facts, exit facts)."""
    first, _, rest = (look or "").partition("\n")
    location = ""
    if m := _ROOM.match(first.strip()):
        location, first = m[1], first.strip()[m.end():]
    objects = []
    for sentence in re.split(r"\.\s+|\.$", first):
        sentence = _FILLERS.sub("", sentence.strip())
        if sentence:
            objects.append(_object_fact(sentence))
    exits = [_exit_fact(sentence) for sentence in re.split(r"\.\s+|\.$|\n", rest) if sentence.strip()]
    return location, objects, exits


def parse_inventory(inv: str) -> list[str]:
    lines = [ln.strip() for ln in (inv or "").split("\n")[1:] if ln.strip()]
    return [_strip_article(ln) for ln in lines if "inventory is currently empty" not in ln.lower()]


def canonical_feedback(observation: str) -> str:
    obs = (observation or "").strip()
    if m := _ROOM.match(obs):
        return f"You are in the {m[1]}."
    if obs.startswith("Inventory:"):
        return "You check your inventory."
    return clean_text(obs)


def abstract_state(observation: str, look: str, inventory: str) -> str:
    location, objects, exits = parse_look(look)
    return AbstractState.make(canonical_feedback(observation), location, objects, exits,
                              parse_inventory(inventory)).render()


# Fixed furniture/appliances: shown as plain facts but never takeable in TWX games.
FURNITURE = frozenset({
    "stove", "oven", "barbeque", "microwave", "sofa", "bed", "toilet", "sink", "bath tub",
    "bathtub", "bath mat", "television", "washing machine", "clothes drier", "work table", "workbench", "bench",
})
_COOKERS = ("stove", "oven", "barbeque", "microwave")


def propose_candidates(state_text: str, game: str = "twc") -> list[str]:
    """Candidate actions for a TWX twc/cookingworld state, from the abstract state alone.

    A superset-leaning rule used for synthetic states (the env's own list is used for real ones).
    Its recall against ``validActions`` is measured in tests/test_twx.py.
    """
    try:
        s = AbstractState.parse(state_text)
    except ValueError:
        return ["look around", "inventory"]
    cands = ["look around", "inventory"]
    receptacles, takeable = [], []
    for fact in s.objects:
        head, has_colon, contents = fact.partition(": ")
        name = re.sub(r" \((?:open|closed)\)$", "", head)
        if head.endswith("(closed)"):
            cands.append(f"open {name}")
        elif head.endswith("(open)"):
            cands.append(f"close {name}")
            receptacles.append(name)
        elif has_colon:
            receptacles.append(name)
        elif name not in FURNITURE:
            takeable.append(name)
        if contents and contents != "empty" and not head.endswith("(closed)"):
            takeable.extend(c for c in contents.split(", ") if c)
    for ex in s.exits:
        direction, _, what = ex.partition(": ")
        cands.append(f"move {direction}")
        if "door" in what:  # TWX offers both door verbs whatever the door's state
            cands += [f"open door to {direction}", f"close door to {direction}"]
    cands += [f"take {t}" for t in takeable]
    cands += [f"put {i} in {r}" for i in s.inventory for r in receptacles]
    if game == "cookingworld":
        entities = s.entities()
        cands += [f"examine {e}" for e in entities] + ["prepare meal"]
        if "cookbook" in entities:
            cands.append("read cookbook")
        cookers = [n for n in entities if n in _COOKERS]
        cands += [f"cook {i} in {c}" for i in s.inventory for c in cookers]
        if "knife" in s.inventory:
            cands += [f"{v} {i}" for i in s.inventory if i != "knife" for v in ("slice", "dice", "chop")]
        if "meal" in s.inventory:
            cands.append("eat meal")
    return list(dict.fromkeys(cands))


class TWXEnv:
    """One TextWorldExpress engine (one JVM via py4j) reused across resets."""

    name = "twx"

    @classmethod
    def side_channels(cls, game: str) -> SideChannels:
        """twc: all of them (they were made for it). Any other TWX game: its dense score and the
        state-only candidate rule; twc's placement and affordance readings and its "items left to
        put away" traces mean nothing there (on a TWX game with rooms to move between, the twc pipeline
        gave an M_exp that a random policy beats 0.75 to 0.02: DESIGN.md)."""
        if game == "twc":
            return SideChannels(progress=True, placements=True, affordances=True, candidate_rule=True,
                                rule_traces=True)
        return SideChannels(progress=True, candidate_rule=True)

    def __init__(self, game: str = "twc", params: str | None = None, step_limit: int = 100,
                 step_timeout_s: float | None = 10.0):
        if game not in GAMES:
            raise ValueError(f"unknown TextWorldExpress game {game!r}; choose one of {', '.join(GAMES)}")
        from textworld_express import TextWorldExpressEnv

        self.game = game
        self.step_timeout_s = step_timeout_s
        self.params = DEFAULT_PARAMS.get(game, "") if params is None else params
        self._env = TextWorldExpressEnv(envStepLimit=step_limit)
        self._loaded: tuple[str, str] | None = None
        self._valid: tuple[str, ...] = ()
        self._gold: list[str] = []
        self._last_score = 0.0
        self._won = False

    def _load(self, game: str, params: str) -> None:
        if self._loaded != (game, params):
            self._env.load(gameName=game, gameParams=params)
            self._loaded = (game, params)

    def tasks(self, split: str, n: int, start: int = 0) -> list[Task]:
        self._load(self.game, self.params)
        seeds = {"train": self._env.getValidSeedsTrain, "dev": self._env.getValidSeedsDev,
                 "test": self._env.getValidSeedsTest}[split]()
        if start + n > len(seeds):
            raise ValueError(f"TWX {self.game} {split} fold has {len(seeds)} seeds; asked for {start}+{n}")
        out = []
        for seed in seeds[start:start + n]:
            obs, infos = self._env.reset(seed=seed, gameFold=_FOLD[split], generateGoldPath=False)
            out.append(Task(task_id=f"twx/{self.game}/{split}/{seed}", env=self.name, game=self.game,
                            split=split, seed=int(seed), instruction=infos["taskDescription"],
                            params=self.params))
        return out

    def _observation(self, observation: str, infos: dict) -> Observation:
        self._valid = tuple(sorted(infos["validActions"]))
        raw = RawObs(feedback=observation, look=infos["look"], inventory=infos["inventory"],
                     candidates=self._valid, score=float(infos["score"]))
        return Observation(state=abstract_state(observation, infos["look"], infos["inventory"]),
                           candidates=self._valid, raw=raw)

    def reset(self, task: Task) -> Observation:
        try:
            self._load(task.game, task.params)
            obs, infos = self._env.reset(seed=task.seed, gameFold=_FOLD[task.split], generateGoldPath=True)
            self._gold = list(self._env.getGoldActionSequence())
        except Exception as exc:
            raise EnvCrash(f"TWX reset failed for {task.task_id}: {exc}") from exc
        self._last_score, self._won = float(infos["score"]), False
        return self._observation(obs, infos)

    def step(self, action: str) -> StepResult:
        valid = action in self._valid
        started = time.monotonic()
        try:
            with deadline(self.step_timeout_s):
                obs, _, done, infos = self._env.step(action)
        except Exception as exc:  # py4j errors, a dead JVM, or our StepTimeout
            raise EnvCrash(f"TWX step {action!r} failed: {failure(exc, started, self.step_timeout_s)}") from exc
        won = bool(infos["tasksuccess"])
        reward = 1.0 if won and not self._won else 0.0
        self._won = self._won or won
        self._last_score = float(infos["score"])
        return StepResult(obs=self._observation(obs, infos), reward=reward, score=self._last_score,
                          done=bool(done or won or infos["taskfailure"]), won=won,
                          lost=bool(infos["taskfailure"]), valid=valid)

    def expert_actions(self) -> list[str]:
        return list(self._gold)

    def propose_candidates(self, state: str) -> list[str]:
        return propose_candidates(state, self.game)

    def close(self) -> None:
        try:
            self._env.close()
            # wait for the JVM to exit, so TextWorldExpressEnv.__del__ (which closes again) finds it
            # gone instead of writing to its closed stdin ("Exception ignored ... BrokenPipeError")
            self._env._gateway.java_process.wait(timeout=10)
        except Exception:
            pass  # the JVM may already be gone; nothing to release
