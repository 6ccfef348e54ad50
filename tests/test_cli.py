import dagster as dg
import json
import subprocess
import sys

from dreamgym_core.io import write_parquet_atomic
from dreamgym_core.schema import Task, tasks_to_arrow


def _run(*args, data):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args, "--data", str(data)],
                          capture_output=True, text=True, timeout=120)


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("demo", "sql", "views", "import"):
        assert cmd in out.stdout


def test_demo_envs_build_valid_experiments_and_a_data_folder_keeps_one_env(tmp_path):
    from pipelines.cli import demo_sizes
    from pipelines.resources import Experiment

    for env in ("twx", "alfworld", "miniwob"):
        sizes = demo_sizes(env)
        spec = Experiment(**sizes["experiment"]).env_spec()
        assert spec.env == env and sizes["iterations"] >= 1
    (tmp_path / "demo_env").write_text("twx\n")
    out = _run("demo", "--env", "miniwob", data=tmp_path)
    assert out.returncode == 2 and "holds a --env twx demo" in out.stderr


def test_sql_json_and_error_exit_code(tmp_path):
    t = Task("twx/twc/train/0", "twx", "twc", "train", 0, "do it")
    write_parquet_atomic(tasks_to_arrow([t]), str(tmp_path / "parquet" / "seed_tasks.parquet"))
    ok = _run("sql", "select task_id from tasks", "--format", "json", data=tmp_path)
    assert ok.returncode == 0 and json.loads(ok.stdout) == [{"task_id": "twx/twc/train/0"}]
    bad = _run("sql", "drop view tasks", data=tmp_path)
    assert bad.returncode == 2 and "only SELECT" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_demo_plan_materializes_every_asset_after_its_upstreams(tmp_path):
    from pipelines.cli import _demo_plan
    from pipelines.definitions import LOOP_KEYS, build_defs

    graph = build_defs(str(tmp_path)).resolve_asset_graph()
    seen: set[str] = set()
    for key, _ in _demo_plan(3):
        keys = [k.to_user_string() for k in LOOP_KEYS] if key == "dreamgym_iteration" else [key]
        for k in keys:
            ups = {p.to_user_string() for p in graph.get(dg.AssetKey(k)).parent_keys} - set(keys)
            assert ups <= seen, f"{k} runs before {sorted(ups - seen)}"
        seen.update(keys)
    # the demo covers every asset but the experiments (their own command: dreamgym experiment TESTBED)
    assert seen == {k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).group_name != "experiments"}


def test_demo_prints_each_iterations_curriculum():
    from pipelines.cli import _curriculum_line

    line = _curriculum_line({"curriculum/proposals": 8, "curriculum/parsed": 7, "curriculum/parse_rate": 0.875,
                             "curriculum/kept": 2, "curriculum/synthetic_tasks": 3,
                             "curriculum/synthetic_success_rate": 0.25})
    assert line == ("curriculum: M_task parsed 7/8 (88%), kept 2; synthetic tasks rolled out 3 "
                    "(success 0.25 in M_exp)")
    assert _curriculum_line({}) == "curriculum: M_task parsed 0/0, kept 0; synthetic tasks rolled out 0"
