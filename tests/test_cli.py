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


def test_sql_json_and_error_exit_code(tmp_path):
    t = Task("twx/twc/train/0", "twx", "twc", "train", 0, "do it")
    write_parquet_atomic(tasks_to_arrow([t]), str(tmp_path / "parquet" / "seed_tasks.parquet"))
    ok = _run("sql", "select task_id from tasks", "--format", "json", data=tmp_path)
    assert ok.returncode == 0 and json.loads(ok.stdout) == [{"task_id": "twx/twc/train/0"}]
    bad = _run("sql", "drop view tasks", data=tmp_path)
    assert bad.returncode == 2 and "only SELECT" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
