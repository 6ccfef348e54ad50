"""ScienceWorld adapter: any of its 30 task types and their variations.

ScienceWorld (Wang et al. 2022) simulates science procedures (boil water, grow a plant, test
conductivity) in a Java engine driven through py4j; one JVM serves every task and variation.
Splits are the engine's own: each task's variations are divided into train / dev / test lists
(``get_variations_train/dev/test``); ``Task.seed`` is the variation index. Settings may carry
``{"simplification": "easy"}`` (or any comma list of ScienceWorld's simplifications).

Abstract state (paper §4.5): the look text is already canonical (no filler), so the parse only
reshapes it into the shared structure: "This room is called the X" -> location, each listed object
-> one fact ("cupboard (open): ceramic cup (containing nothing), drawer"), "A door to the Y (that
is open)" -> exit "door to Y (open)", the inventory lines -> inventory. Identical objects are
listed once with a count ("wood cup (containing nothing) (x3)") because the state's lists are sets.

Reward: outcome reward 1.0 on the step the task is completed (score 100), else 0.0 (paper §4.1);
``score`` is the engine's 0-100 score over 100. A wrong "focus on" ends the episode as lost
(the engine sets the score to -100, so ``score`` is -1.0 there).

Validity departs from the TextWorld adapters: ScienceWorld's valid-action list is built from
canonical referents ("pick up metal pot") while its parser also accepts other phrasings ("pick
up metal pot in cupboard", the gold paths use them) and the list offers actions on things it
cannot reach. So an action is valid iff the engine parsed it (its reply is not "No known action
matches that input."); the list itself (~100-400 actions, sorted) is the candidate set.

Determinism: the same variation always starts in the same state, but the engine is not fully
repeatable around it: the valid list names some objects by randomly chosen aliases ("paint in
cup" / "red paint on wood cup"), look lists objects in varying order (the parse sorts them), and
the gold path is re-drawn at each reset (another route or another correct animal).

Failures: engine errors raise ``EnvCrash``; a step or reset past ``step_timeout_s`` (a load past
``load_timeout_s``) is interrupted by SIGALRM in the main thread and becomes ``EnvCrash``; the
JVM is then shut down and the next reset starts a fresh one (about 3 s).

Departures from the paper: none in the protocol; ScienceWorld stands in for the paper's
ALFWorld-style embodied tasks with longer procedures.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter

from dreamgym_core.envs._deadline import deadline, failure
from dreamgym_core.envs.base import EnvCrash, Observation, SideChannels, StepResult
from dreamgym_core.schema import RawObs, Task
from dreamgym_core.state import AbstractState, clean_text

SETTINGS_KEYS = ("simplification",)
REJECTED = "No known action matches that input."
_SPLITS = ("train", "dev", "test")

_LOCATION = re.compile(r"This (?:room|outside location) is called the (.+?)\.")
_SEEN = re.compile(r"(?:In it|Here), you see:|Here you see:")
_ARTICLE_AT_ITEM = re.compile(r"(^|\(containing |, |: )(?:a|an|the)\s+", re.I)
_DOOR = re.compile(r"^(?:a|an|the)\s+door to (?:the )?(.+?) \(that is (\w+)\)$", re.I)


def _strip_articles(phrase: str) -> str:
    """Drop the article at the start of every listed item, nested lists included."""
    return _ARTICLE_AT_ITEM.sub(r"\1", clean_text(phrase)).strip()


def _top_level_sentences(text: str) -> list[str]:
    """Split at ". " outside parentheses: nested descriptions ("(containing a tree. On the tree
    you see: ...)") stay inside their item."""
    out, depth, cur = [], 0, ""
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch == "." and depth == 0 and text[i + 1:i + 2] in (" ", ""):
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [x for x in out if x] or [""]


def _object_fact(line: str) -> str:
    """One look line -> one canonical fact.

    "a cupboard. The cupboard door is open. In the cupboard is: a tin cup (containing nothing)."
      -> "cupboard (open): tin cup (containing nothing)"
    "a sink, which is turned off. In the sink is: nothing." -> "sink (off): empty"
    """
    head, *rest = _top_level_sentences(_strip_articles(line.strip().rstrip(".")))
    tags = []
    if m := re.fullmatch(r"(.+?), which is (?:turned )?(on|off|activated|deactivated)", head):
        head = m.group(1)
        tags.append(m.group(2))
    contents = None
    for sentence in rest:
        if m := re.fullmatch(r"The .+? door is (open|closed)", sentence):
            tags.append(m.group(1))
        elif m := re.fullmatch(r"(?:On|In) the .+? is: (.*)", sentence):
            contents = m.group(1).strip().rstrip(",").strip() or "nothing"
        elif sentence:
            tags.append(sentence)
    fact = f"{head} ({', '.join(tags)})" if tags else head
    if contents is not None:
        fact += f": {'empty' if contents == 'nothing' else _strip_articles(contents)}"
    return fact


def _counted(facts: list[str]) -> list[str]:
    """Keep multiplicity: the state stores sets, so k identical facts become one with "(xk)"."""
    return [f if k == 1 else f"{f} (x{k})" for f, k in Counter(facts).items()]


def parse_look(look: str) -> tuple[str, list[str], list[str]]:
    """Look text -> (location, object facts, exit facts)."""
    text = look or ""
    m = _LOCATION.search(text)
    location = m.group(1) if m else ""
    body, _, extra = text.partition("You also see:")
    seen = _SEEN.split(body, maxsplit=1)
    lines = seen[1].split("\n") if len(seen) == 2 else []
    objects = [_object_fact(ln) for ln in lines if ln.strip()]
    objects = [o for o in objects if o != "agent"]  # the player, listed in every room
    exits = []
    for ln in extra.split("\n"):
        if not ln.strip():
            continue
        if d := _DOOR.match(ln.strip()):
            exits.append(f"door to {d.group(1)} ({d.group(2)})")
        else:
            exits.append(_object_fact(ln))
    return location, _counted(objects), _counted(exits)


def parse_inventory(inventory: str) -> list[str]:
    lines = (inventory or "").split("\n")[1:]
    return _counted([_object_fact(ln) for ln in lines if ln.strip()])


def canonical_feedback(observation: str) -> str:
    obs = (observation or "").strip()
    if m := _LOCATION.match(obs):
        return f"You are in the {m.group(1)}."
    if obs.startswith("In your inventory"):
        return "You check your inventory."
    return clean_text(obs)


def abstract_state(observation: str, look: str, inventory: str) -> str:
    location, objects, exits = parse_look(look)
    return AbstractState.make(canonical_feedback(observation), location, objects, exits,
                              parse_inventory(inventory)).render()


# --------------------------------------------------------------------------------------------
# Candidate actions from an abstract state (for synthetic states; real states use the env's list)

_ONE_ARG = ("focus on", "examine", "look at", "pick up", "open", "close", "activate", "deactivate", "eat",
            "read", "mix", "look in")
ROOMS = ("art studio", "bathroom", "bedroom", "foundry", "greenhouse", "hallway", "kitchen", "living room",
         "outside", "workshop")


def _name(fact_head: str) -> str:
    """'cupboard (open)' -> 'cupboard'; 'thermometer, currently reading ...' -> 'thermometer'."""
    name = re.sub(r"\s*\(.*$|,.*$", "", fact_head).strip()
    return re.sub(r" titled .*$", "", name)


def _top_level_items(contents: str) -> list[str]:
    """Split a contents list at commas outside parentheses."""
    out, depth, cur = [], 0, ""
    for ch in contents:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [x for x in out + [cur.strip()] if x and x not in ("empty", "nothing")]


def _referents(item: str, holder: str | None) -> list[str]:
    """How ScienceWorld's parser can name ``item`` (inside ``holder``): "water", "substance in pot"..."""
    names = [item] if holder is None else [item, f"{item} in {holder}"]
    if item.startswith("substance called "):
        names.append(item[len("substance called "):])
        if holder is not None:
            names.append(f"substance in {holder}")
    return names


def _things(item_text: str, holder: str | None, receptacles: list[str]) -> list[str]:
    """Referents of an item and, recursively, of what it contains ("(containing ...)")."""
    name = _name(item_text)
    out = _referents(name, holder)
    if m := re.search(r"\(containing (.*)\)", item_text):
        receptacles.append(name)
        inner = _top_level_items(m.group(1))
        # The parser also knows a container by its noun and contents: "cup containing salt and water".
        held = [re.sub(r"^substance called ", "", _name(i)) for i in inner] or ["nothing"]
        alias = f"{name.split()[-1]} containing {' and '.join(held)}"
        out += [alias] if holder is None else [alias, f"{alias} in {holder}"]
        for item in inner:
            out += _things(item, name, receptacles)
    return out


def propose_candidates(state_text: str) -> list[str]:
    """ScienceWorld's action templates over the entities named in an abstract state.

    Single-object verbs for every visible thing (also named through its holder: "substance in
    metal pot", "thermometer in inventory"), "move X to Y" into every receptacle, "pour X into Y",
    "use X on Y" for carried tools, doors and teleports. Its recall of the gold actions and of
    the env's valid list is measured in tests/test_scienceworld_env.py.
    """
    try:
        s = AbstractState.parse(state_text)
    except ValueError:
        return ["look around", "inventory"]
    things: list[str] = []
    receptacles: list[str] = []
    for fact in s.objects:
        head, has_colon, contents = fact.partition(": ")
        things += _things(head, None, receptacles)
        if has_colon:
            receptacles.append(_name(head))
            for item in _top_level_items(contents):
                things += _things(item, _name(head), receptacles)
    inventory: list[str] = []
    for fact in s.inventory:
        inventory += [_name(fact), f"{_name(fact)} in inventory"]
        things += _things(fact, "inventory", receptacles)
    cands = ["look around", "inventory", "task", "wait", "wait1"] + [f"teleport to {r}" for r in ROOMS]
    for ex in s.exits:
        if m := re.fullmatch(r"door to (.+?) \((open|closed)\)", ex):
            cands += [f"go to {m.group(1)}", f"open door to {m.group(1)}", f"close door to {m.group(1)}"]
    entities = list(dict.fromkeys(things + inventory))
    cands += [f"{verb} {e}" for e in entities for verb in _ONE_ARG]
    cands += [f"put down {i}" for i in inventory]
    cands += [f"move {x} to {r}" for x in entities for r in receptacles + ["inventory"] if x != r]
    cands += [f"pour {x} into {r}" for x in entities for r in receptacles]
    cands += [f"use {i} on {e}" for i in inventory for e in entities if i != e]
    return sorted(dict.fromkeys(cands))


# --------------------------------------------------------------------------------------------
# The adapter


class ScienceWorldEnv:
    """One ScienceWorld engine (one JVM via py4j) reused across tasks and variations."""

    name = "scienceworld"

    @classmethod
    def side_channels(cls, game: str) -> SideChannels:
        """Its 0-100 score rewards sub-goals (progress) and it has a state-only candidate rule; twc's
        placement, affordance and item-counting readings do not fit its procedures."""
        return SideChannels(progress=True, candidate_rule=True)

    def __init__(self, task_name: str, settings: dict, step_limit: int = 100, step_timeout_s: float = 30.0,
                 load_timeout_s: float = 300.0):
        settings = dict(settings or {})
        unknown = sorted(set(settings) - set(SETTINGS_KEYS))
        if unknown:
            raise ValueError(f"ScienceWorld: unknown setting(s) {unknown}; known: {list(SETTINGS_KEYS)}")
        self.settings = settings
        self.simplification = str(settings.get("simplification", ""))
        self.step_limit = step_limit
        self.step_timeout_s = step_timeout_s
        self.load_timeout_s = load_timeout_s
        self._env = None
        self._loaded: tuple[tuple[str, int, str], bool] | None = None
        self._variations: dict[tuple[str, str], dict[str, list[int]]] = {}
        self._start()
        from scienceworld.utils import infer_task

        names = list(self._env.get_task_names())
        self.task_name = infer_task(task_name)
        if self.task_name not in names:
            self.close()
            raise ValueError(f"unknown ScienceWorld task {task_name!r}; choose one of {', '.join(names)}")
        self._valid: tuple[str, ...] = ()
        self._gold: list[str] = []
        self._instructions: dict[tuple[str, int, str], str] = {}
        self._steps = 0
        self._won = False
        self._task_id = ""

    @property
    def params(self) -> str:
        return json.dumps(self.settings, sort_keys=True)

    def _start(self) -> None:
        from scienceworld import ScienceWorldEnv as Engine

        self._env = Engine("", envStepLimit=self.step_limit)

    def _load(self, task_name: str, variation: int, simplification: str, gold: bool) -> None:
        """Load a variation unless it is already loaded (a reset then only rewinds it)."""
        if self._env is None:
            self._start()
        key = (task_name, variation, simplification)
        if self._loaded is not None and self._loaded[0] == key and (self._loaded[1] or not gold):
            return
        self._loaded = None
        with deadline(self.load_timeout_s):
            self._env.load(task_name, variation, simplification, generateGoldPath=gold)
        self._loaded = (key, gold)

    def variations(self, split: str) -> list[int]:
        """The engine's own variation list for a split of this task (disjoint across splits)."""
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        key = (self.task_name, self.simplification)
        if key not in self._variations:
            self._load(self.task_name, 0, self.simplification, False)
            self._variations[key] = {s: [int(v) for v in fn()] for s, fn in (
                ("train", self._env.get_variations_train), ("dev", self._env.get_variations_dev),
                ("test", self._env.get_variations_test))}
        return list(self._variations[key][split])

    def tasks(self, split: str, n: int, start: int = 0) -> list[Task]:
        """The split's variations ``start .. start+n``; loads each once to read its description."""
        variations = self.variations(split)
        if start < 0 or start + n > len(variations):
            raise ValueError(f"ScienceWorld {self.task_name} {split} split has {len(variations)} variations; "
                             f"asked for {start}+{n}")
        out = []
        for variation in variations[start:start + n]:
            key = (self.task_name, int(variation), self.simplification)
            if key not in self._instructions:
                self._load(self.task_name, int(variation), self.simplification, False)
                self._instructions[key] = self._env.get_task_description()
            out.append(Task(task_id=f"scienceworld/{self.task_name}/{split}/{variation}", env=self.name,
                            game=self.task_name, split=split, seed=int(variation),
                            instruction=self._instructions[key], params=self.params))
        return out

    def _observation(self, observation: str, info: dict) -> Observation:
        self._valid = tuple(sorted(info["valid"]))
        raw = RawObs(feedback=observation, look=info["look"], inventory=info["inv"], candidates=self._valid,
                     score=info["score"] / 100.0)
        return Observation(state=abstract_state(observation, info["look"], info["inv"]),
                           candidates=self._valid, raw=raw)

    def reset(self, task: Task) -> Observation:
        settings = json.loads(task.params) if task.params else self.settings
        started = time.monotonic()
        try:
            self._load(task.game, task.seed, str(settings.get("simplification", "")), True)
            started = time.monotonic()
            with deadline(self.step_timeout_s):
                observation, info = self._env.reset()
                self._gold = list(self._env.get_gold_action_sequence())
        except Exception as exc:
            self._drop_engine()
            raise EnvCrash(f"ScienceWorld reset failed for {task.task_id}: "
                           f"{failure(exc, started, self.step_timeout_s)}") from exc
        self._steps, self._won, self._task_id = 0, False, task.task_id
        return self._observation(observation, info)

    def step(self, action: str) -> StepResult:
        if self._env is None:
            raise EnvCrash("ScienceWorld step before reset (or after a crash)")
        started = time.monotonic()
        try:
            with deadline(self.step_timeout_s):
                observation, _, completed, info = self._env.step(action)
        except Exception as exc:
            self._drop_engine()
            raise EnvCrash(f"ScienceWorld step {action!r} failed in {self._task_id}: "
                           f"{failure(exc, started, self.step_timeout_s)}") from exc
        self._steps += 1
        won, lost = info["score"] >= 100, info["score"] < 0
        reward = 1.0 if won and not self._won else 0.0
        self._won = self._won or won
        return StepResult(obs=self._observation(observation, info), reward=reward, score=info["score"] / 100.0,
                          done=bool(completed or won or lost or self._steps >= self.step_limit),
                          won=won, lost=lost, valid=observation.strip() != REJECTED)

    def expert_actions(self) -> list[str]:
        return list(self._gold)

    def propose_candidates(self, state: str) -> list[str]:
        return propose_candidates(state)

    def _drop_engine(self) -> None:
        """After a failure the JVM's state is unknown: shut it down; the next reset starts a fresh one."""
        env, self._env, self._loaded = self._env, None, None
        if env is not None:
            try:
                env.close()
            except Exception:
                pass

    def close(self) -> None:
        self._drop_engine()
