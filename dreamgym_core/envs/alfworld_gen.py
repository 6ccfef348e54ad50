"""ALFWorld games generated locally from the ``alfworld`` package's shipped assets.

ALFWorld (Shridhar et al. 2021) plays ALFRED household tasks as TextWorld-PDDL games. The wheel
ships the PDDL domain (``alfred.pddl``), the text grammar (``alfred.twl2``), the 120 AI2-THOR floor
plans (receptacle ids and the object types of each scene), the object/receptacle compatibility
tables, the goal templates of the six task types and the handcoded experts; it does not ship the
3,553 per-game files (object placements from ALFRED), whose download needs the internet. So this
module writes those files itself (shared/notes/offline-envs-models.md §1.2): keep a floor plan's
receptacles, put 1-2 instances of a sample of its pickupable object types into random compatible
receptacles (lamps on a table-like receptacle), pick a feasible goal of the requested task type,
and emit ``game.tw-pddl`` (domain + grammar with the goal text + problem) and ``traj_data.json``
(task type and goal parameters, which the handcoded expert reads).

Splits (all deterministic in (split, index)):
    train       seen floor plans, seen (object, receptacle) goal pairings
    dev / test  unseen floor plans (disjoint sets: in each room type of 30 plans, 25-26 are dev and
                27-30 test), seen pairings
    dev_pairs / test_pairs  seen floor plans, goal pairings never used as a goal in train (about
                one in six (object type, receptacle type) pairs, chosen by a hash)
Task type = index % 6, so every split is balanced over the six types.

Departures from ALFWorld: object placement and the number of instances are sampled by us, not
taken from ALFRED, so difficulty and the task distribution differ from the official splits and
success rates are not comparable with published ALFWorld numbers. Sliced and movable-receptacle
variants are left out (ALFWorld's TextWorld mode skips them too). Fewer object types per scene
than ALFRED keep the PDDL engine (which lists every admissible command each step) fast enough for
CPU runs; ``max_object_types`` sets it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

TASK_TYPES = ("pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
              "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place")
SPLITS = ("train", "dev", "test", "dev_pairs", "test_pairs")
ROOM_GROUPS = (range(1, 31), range(201, 231), range(301, 331), range(401, 431))
"""The 120 floor plans: kitchens 1-30, living rooms 201-230, bedrooms 301-330, bathrooms 401-430."""
LAMP_HOSTS = ("Desk", "SideTable", "Dresser", "Shelf", "DiningTable", "CoffeeTable", "Sofa", "ArmChair", "Bed")
"""Receptacle types a desk/floor lamp is placed on (ALFRED's lamps stand on furniture)."""
GENERATOR_VERSION = 1
"""Part of the cache key: bump when the generated games change."""


def split_floor_plans(split: str) -> list[int]:
    """Floor plans of a split: per room type, 1-24 train (and *_pairs), 25-26 dev, 27-30 test."""
    if split not in SPLITS:
        raise ValueError(f"ALFWorld split must be one of {SPLITS}, got {split!r}")
    out = []
    for group in ROOM_GROUPS:
        plans = list(group)
        out += {"train": plans[:24], "dev_pairs": plans[:24], "test_pairs": plans[:24], "dev": plans[24:26],
                "test": plans[26:]}[split]
    return out


def heldout_pair(obj_type: str, recep_type: str) -> bool:
    """True for the (object, receptacle) goal pairings reserved for ``*_pairs`` (about 1 in 6)."""
    return zlib.crc32(f"{obj_type}->{recep_type}".encode()) % 6 == 0


def _mangle(thor_id: str) -> str:
    """THOR ids as ALFWorld's demangler expects them ("Watch|+01.00|..." -> "Watch_bar__plus_01_dot_00...")."""
    for a, b in (("|", "_bar_"), ("+", "_plus_"), ("-", "_minus_"), (".", "_dot_"), (",", "_comma_")):
        thor_id = thor_id.replace(a, b)
    return thor_id


@dataclass(frozen=True)
class GameSpec:
    """What one generated game is: enough to describe it and to regenerate it."""

    split: str
    index: int
    floor_plan: int
    task_type: str
    object_target: str
    parent_target: str
    toggle_target: str
    instruction: str


def _constants():
    import alfworld.gen.constants as C

    return C


def _layout_dir() -> str:
    return os.path.join(os.path.dirname(_constants().__file__), "layouts")


def _scene(floor_plan: int) -> tuple[list[str], set[str]]:
    """(receptacle THOR ids, object types present) of a shipped floor plan."""
    base = os.path.join(_layout_dir(), f"FloorPlan{floor_plan}")
    with open(f"{base}-openable.json") as f:
        receptacles = sorted(json.load(f))
    with open(f"{base}-objects.json") as f:
        types = set(json.load(f))
    return receptacles, types


def _receptacle_type(thor_id: str) -> str:
    """"Sink|+00.71|+00.82|-01.77|SinkBasin" -> "SinkBasin"; "Cabinet|+00.02|..." -> "Cabinet"."""
    parts = thor_id.split("|")
    return parts[-1] if parts[-1].endswith("Basin") else parts[0]


def _pickupable() -> set[str]:
    C = _constants()
    return (set().union(*C.VAL_RECEPTACLE_OBJECTS.values()) - {t for t in C.OBJECTS if t.endswith("Sliced")}
            - set(C.MOVABLE_RECEPTACLES) | {"Mug", "Cup", "Bowl", "Plate", "Pan", "Pot"}) - {"Box"}


def _thor_id(obj_type: str, rng: random.Random) -> str:
    return f"{obj_type}|{rng.uniform(-3, 3):+06.2f}|{rng.uniform(0, 2):+06.2f}|{rng.uniform(-3, 3):+06.2f}"


def _goal_candidates(task_type, objs, placed, rec_type, lamp_types, split) -> list[tuple[str, str, str]]:
    """Feasible (object type, receptacle type, lamp type) goals of ``task_type`` in a scene."""
    C = _constants()
    otype = lambda o: o.split("|")[0]  # noqa: E731
    present_rt = sorted(set(rec_type.values()))
    counts: dict[str, int] = {}
    for o in objs:
        counts[otype(o)] = counts.get(otype(o), 0) + 1
    need = {"pick_clean_then_place_in_recep": ("Cleanable", "SinkBasin"),
            "pick_heat_then_place_in_recep": ("Heatable", "Microwave"),
            "pick_cool_then_place_in_recep": ("Coolable", "Fridge")}
    out = set()
    if task_type == "look_at_obj_in_light":
        return sorted((ot, "", lamp) for ot in counts for lamp in lamp_types)
    for ot in counts:
        if task_type in need:
            prop, appliance = need[task_type]
            if ot not in C.VAL_ACTION_OBJECTS[prop] or appliance not in present_rt:
                continue
        if task_type == "pick_two_obj_and_place" and counts[ot] < 2:
            continue
        for rt in present_rt:
            if ot not in C.VAL_RECEPTACLE_OBJECTS.get(rt, ()) or (task_type in need and rt == need[task_type][1]):
                continue  # (the appliance itself is never the target: "cool a mug and put it in the fridge")
            if heldout_pair(ot, rt) != split.endswith("_pairs"):
                continue
            if any(otype(o) == ot and rec_type[placed[o]] == rt for o in objs):
                continue  # already satisfied at the start
            out.add((ot, rt, ""))
    return sorted(out)


def sample_game(split: str, index: int, max_object_types: int = 8, max_tries: int = 50):
    """-> (GameSpec, pddl problem text). Deterministic in (split, index)."""
    C = _constants()
    task_type = TASK_TYPES[index % len(TASK_TYPES)]
    plans = split_floor_plans(split)
    pickupable = _pickupable()
    for attempt in range(max_tries):
        rng = random.Random(zlib.crc32(f"alfworld|{split}|{index}|{attempt}".encode()))
        fp = rng.choice(plans)
        recs, scene_types = _scene(fp)
        rec_type = {r: _receptacle_type(r) for r in recs}
        types = sorted(scene_types & pickupable)
        rng.shuffle(types)
        objs: list[str] = []
        placed: dict[str, str] = {}
        for t in types:
            if len(set(o.split("|")[0] for o in objs)) >= max_object_types:
                break
            hosts = [r for r in recs if t in C.VAL_RECEPTACLE_OBJECTS.get(rec_type[r], ())]
            if not hosts:
                continue
            for _ in range(rng.randint(1, 2)):
                oid = _thor_id(t, rng)
                objs.append(oid)
                placed[oid] = rng.choice(hosts)
        lamps: list[str] = []
        lamp_hosts = [r for r in recs if rec_type[r] in LAMP_HOSTS]
        for lamp in ("DeskLamp", "FloorLamp"):
            if lamp in scene_types and lamp_hosts:
                oid = _thor_id(lamp, rng)
                lamps.append(oid)
                placed[oid] = rng.choice(lamp_hosts)
        cands = _goal_candidates(task_type, objs, placed, rec_type, sorted({l.split("|")[0] for l in lamps}), split)
        if not cands:
            continue
        ot, rt, lamp = rng.choice(cands)
        template = rng.choice(_goal_library()[task_type]["templates"])
        instruction = template.format(obj=ot.lower(), recep=rt.lower(), toggle=lamp.lower(), mrecep="")
        spec = GameSpec(split, index, fp, task_type, ot, rt, lamp, instruction)
        return spec, _problem(spec, recs, rec_type, objs + lamps, placed)
    raise RuntimeError(f"ALFWorld generator: no feasible {task_type} game for {split}/{index} in {max_tries} tries")


def _goal_library():
    import alfworld.gen.goal_library as G

    return G.gdict


def _problem(spec: GameSpec, recs, rec_type, objs, placed) -> str:
    C = _constants()
    otype = lambda o: o.split("|")[0]  # noqa: E731
    goal = _goal_library()[spec.task_type]["pddl"].format(
        obj=spec.object_target, recep=spec.parent_target, toggle=spec.toggle_target, mrecep="").replace("#", "-")
    locs = {r: f"loc_{i}" for i, r in enumerate(recs)}
    present = {otype(o) for o in objs}
    lines = [f"(define (problem gen_{spec.split}_{spec.index})", "(:domain alfred)", "(:objects",
             "agent1 - agent", "locCenter - location"]
    lines += [f"{t}Type - otype" for t in sorted(set(C.OBJECTS) - set(C.RECEPTACLES) | set(C.MOVABLE_RECEPTACLES) | present)]
    lines += [f"{t}Type - rtype" for t in sorted(set(C.RECEPTACLES) - set(C.MOVABLE_RECEPTACLES))]
    lines += [f"{_mangle(o)} - object" for o in objs] + [f"{_mangle(r)} - receptacle" for r in recs]
    lines += [f"{loc} - location" for loc in locs.values()] + [")", "(:init", "(atLocation agent1 locCenter)"]
    for r in recs:
        lines += [f"(receptacleType {_mangle(r)} {rec_type[r]}Type)", f"(receptacleAtLocation {_mangle(r)} {locs[r]})"]
        if rec_type[r] in C.OPENABLE_CLASS_LIST:
            lines.append(f"(openable {_mangle(r)})")
    # PutObject needs (canContain RType OType); without any, FastDownward finds the task trivially unsolvable
    for rt in sorted(set(rec_type.values())):
        lines += [f"(canContain {rt}Type {ot}Type)" for ot in sorted(C.VAL_RECEPTACLE_OBJECTS.get(rt, ())) if ot in present]
    for o in objs:
        m, t = _mangle(o), otype(o)
        lines += [f"(objectType {m} {t}Type)", f"(inReceptacle {m} {_mangle(placed[o])})",
                  f"(objectAtLocation {m} {locs[placed[o]]})"]
        if t not in C.VAL_ACTION_OBJECTS["Toggleable"]:
            lines.append(f"(pickupable {m})")
        if t in C.MOVABLE_RECEPTACLES:
            lines.append(f"(isReceptacleObject {m})")
        for prop, pred in (("Heatable", "heatable"), ("Coolable", "coolable"), ("Cleanable", "cleanable"),
                           ("Toggleable", "toggleable")):
            if t in C.VAL_ACTION_OBJECTS[prop]:
                lines.append(f"({pred} {m})")
    lines += [")", goal]
    return "\n".join(lines)


def game_dir(cache_dir: str | Path, split: str, index: int, max_object_types: int) -> Path:
    return Path(cache_dir) / "alfworld" / f"v{GENERATOR_VERSION}-t{max_object_types}" / split / str(index)


def ensure_game(cache_dir: str | Path, split: str, index: int, max_object_types: int = 8) -> Path:
    """Folder holding ``game.tw-pddl``, ``traj_data.json`` and ``spec.json``, generated on a cache miss.

    Written into a private folder then renamed, so concurrent workers never read a half-written game.
    """
    folder = game_dir(cache_dir, split, index, max_object_types)
    if (folder / "spec.json").is_file():
        return folder
    import alfworld.info as I

    spec, problem = sample_game(split, index, max_object_types)
    traj = {"task_type": spec.task_type, "scene": {"floor_plan": f"FloorPlan{spec.floor_plan}"},
            "pddl_params": {"object_target": spec.object_target, "parent_target": spec.parent_target,
                            "toggle_target": spec.toggle_target, "mrecep_target": "", "object_sliced": False}}
    with open(I.ALFRED_TWL2_PATH) as f:
        grammar = f.read().replace("UNKNOWN GOAL", spec.instruction)
    with open(I.ALFRED_PDDL_PATH) as f:
        domain = f.read()
    tmp = folder.parent / f".tmp-{index}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        (tmp / "traj_data.json").write_text(json.dumps(traj, sort_keys=True))
        (tmp / "game.tw-pddl").write_text(json.dumps({"pddl_domain": domain, "grammar": grammar,
                                                     "pddl_problem": problem, "solvable": True}))
        (tmp / "spec.json").write_text(json.dumps(spec.__dict__, sort_keys=True))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "spec.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_spec(folder: Path) -> GameSpec:
    return GameSpec(**json.loads((Path(folder) / "spec.json").read_text()))
