"""The analysis scripts' pure parts: counting lamp decisions, replacing a results row."""

import csv
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _state(lit, done):
    return (f"feedback: x\nlocation: control room\nobjects: lamp ({lit}) | panel ({done} of 3 lit)\n"
            "exits: none\ninventory: none")


def test_lamp_colours_counts_presses_of_the_lit_colour_per_colour_and_position():
    count = _script("lamp_colours").count
    decisions = [(_state("red", 0), "press red"), (_state("red", 0), "press blue"), (_state("green", 1), "press blue"),
                 (_state("green", 2), "press green"), (_state("off", 3), "press red")]
    rows = {(r["lit"], r["position"]): r for r in count(decisions)}
    # plain reference: per key, decisions and hits
    ref = {}
    for state, action in decisions:
        if "lamp (off)" in state:
            continue
        lit = state.split("lamp (")[1].split(")")[0]
        pos = "start" if "panel (0 of" in state else "after a hit"
        n, hit = ref.get((lit, pos), (0, 0))
        ref[(lit, pos)] = (n + 1, hit + (action == f"press {lit}"))
    assert {k: (r["decisions"], r["pressed_lit"]) for k, r in rows.items()} == ref == \
        {("red", "start"): (2, 1), ("green", "after a hit"): (2, 1)}
    assert rows[("red", "start")]["share_lit"] == 1.0 and rows[("green", "after a hit")]["share_lit"] == 1.0


def test_sim_real_gap_replaces_the_row_of_its_testbed_and_seed(tmp_path):
    mod = _script("sim_real_gap")
    out = str(tmp_path / "gap.csv")
    row = {c: 0 for c in mod.COLUMNS}
    mod.write_row(out, {**row, "testbed": "lamp", "arm": "dreamgym", "seed": 1, "real_success": 0.5})
    mod.write_row(out, {**row, "testbed": "lamp", "arm": "dreamgym", "seed": 0, "real_success": 0.9})
    mod.write_row(out, {**row, "testbed": "lamp", "arm": "dreamgym_ppo", "seed": 1, "real_success": 0.7})
    mod.write_row(out, {**row, "testbed": "lamp", "arm": "dreamgym", "seed": 1, "real_success": 0.6})
    with open(out) as f:
        got = [(r["seed"], r["real_success"]) for r in csv.DictReader(f)]
    assert got == [("0", "0.9"), ("1", "0.6"), ("1", "0.7")] and not os.path.exists(out + ".tmp")


def test_the_results_page_renders_the_gap_and_colour_rows(tmp_path):
    from pipelines.results_docs import write_results_doc

    res = tmp_path / "results"
    res.mkdir()
    gap, colours = _script("sim_real_gap"), _script("lamp_colours")
    gap.write_row(str(res / "sim_real_gap.csv"), {**{c: 0 for c in gap.COLUMNS}, "testbed": "lamp", "arm": "dreamgym",
                                                  "seed": 1, "real_success": 0.51, "sim_success": 0.81, "sim_only": 30})
    with open(res / "lamp_colours.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=colours.COLUMNS)
        w.writeheader()
        for r in colours.count([(_state("red", 1), "press red"), (_state("green", 0), "press blue")]):
            w.writerow({"testbed": "lamp", "arm": "dreamgym", "seed": 1, "where": "sim", "loop": "x", **r})
    text = open(write_results_doc(str(res), str(tmp_path / "docs" / "results.md"))).read()
    assert "| lamp | dreamgym | 1 | 0 | 0 | 0.510 | 0.810 | 0 | 30 | 0 |" in text
    assert "| dreamgym | 1 | sim | after a hit | never lit | never lit | 1/1 (1.00) | never lit |" in text
    assert "| dreamgym | 1 | sim | start | never lit | 0/1 (1.00) | never lit | never lit |" in text
