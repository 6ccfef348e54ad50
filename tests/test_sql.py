import json

import pyarrow as pa
import pytest

from dreamgym_core.collect import CollectConfig, collect
from dreamgym_core.io import write_parquet_atomic
from dreamgym_core.schema import tasks_to_arrow, trajectories_to_arrow
from dreamgym_core.sql import run_query


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, twx_env):
    root = tmp_path_factory.mktemp("data")
    tasks = twx_env.tasks("train", 3)
    trajs, _ = collect(twx_env, tasks, CollectConfig(seed=1))
    write_parquet_atomic(tasks_to_arrow(tasks), str(root / "parquet" / "seed_tasks.parquet"))
    table = trajectories_to_arrow(trajs)
    # a partitioned asset: two partitions of the same data
    write_parquet_atomic(table, str(root / "parquet" / "rollouts" / "001.parquet"))
    write_parquet_atomic(table.slice(0, 10), str(root / "parquet" / "rollouts" / "002.parquet"))
    # an annotation table derived from those rows (as cot_annotations is): must not be counted again
    annotated = table.append_column("reasoning", pa.array(["why"] * table.num_rows))
    write_parquet_atomic(annotated, str(root / "parquet" / "cot_annotations.parquet"))
    return root, table.num_rows, len(trajs)


def test_views_span_assets_and_partitions(data_dir):
    root, rows, n_traj = data_dir
    out = json.loads(run_query(root, "select _partition, count(*) n from rollouts group by 1 order by 1", fmt="json"))
    assert out == [{"_partition": "001", "n": rows}, {"_partition": "002", "n": 10}]
    total = json.loads(run_query(root, "select count(*) n from transitions", fmt="json"))[0]["n"]
    assert total == rows + 10
    trajs = json.loads(run_query(root, "select count(*) n, sum(success::int) s from trajectories "
                                       "where asset = 'rollouts'", fmt="json"))[0]
    assert trajs["n"] >= n_traj and trajs["s"] >= 3  # 3 expert episodes at least
    assert json.loads(run_query(root, "select count(*) n from tasks", fmt="json"))[0]["n"] == 3
    assert json.loads(run_query(root, "select count(*) n from cot_annotations", fmt="json"))[0]["n"] == rows
    assets = json.loads(run_query(root, "select distinct asset from transitions", fmt="json"))
    assert assets == [{"asset": "rollouts"}]


def test_formats(data_dir):
    root = data_dir[0]
    csv = run_query(root, "select task_id from tasks order by 1", fmt="csv").splitlines()
    assert csv[0] == '"task_id"' and len(csv) == 4
    table = run_query(root, "select task_id from tasks order by 1")
    assert "twx/twc/train/0" in table and "(3 rows)" in table


@pytest.mark.parametrize("sql,msg", [("delete from tasks", "only SELECT"),
                                     ("copy (select 1) to 'x.csv'", "only SELECT"),
                                     ("create table t(a int)", "only SELECT"),
                                     ("select nope from tasks", "nope"),
                                     ("selec 1", "does not parse")])
def test_rejects_writes_and_reports_errors(data_dir, sql, msg):
    with pytest.raises(ValueError, match=msg):
        run_query(data_dir[0], sql)


def test_empty_data_dir_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="make demo"):
        run_query(tmp_path, "select 1")


def test_curriculum_view_counts_proposals_and_synthetic_rollouts(tmp_path):
    """Per iteration: proposals / parsed / kept / drops from task_proposals, synthetic tasks rolled out
    and their success from rollouts (originals left out), by hand."""
    from dreamgym_core.curriculum import proposals_table
    from dreamgym_core.schema import Task, Trajectory, Transition

    def traj(task, j, won, k):
        step = Transition(f"{task.task_id}#{j}", task.task_id, "twx", 0, "s", "a", "s2", float(won), 0.0, True, won,
                          not won, True, "policy", source="synthetic", policy="p", iteration=k)
        return Trajectory(step.traj_id, task, "p", (step,))

    orig = Task("t/1", "twx", "twc", "train", 1, "do")
    syn = [Task(f"syn/001/{i}", "twx", "twc", "train", 1, "do", source="synthetic", parent_task_id="t/1",
                iteration=1, initial_state="x") for i in range(2)]
    # iteration 2 rolled out both variants (3 episodes, 2 won) and the original (won, not counted)
    rolled = [traj(syn[0], 0, True, 2), traj(syn[0], 1, False, 2), traj(syn[1], 0, True, 2), traj(orig, 0, True, 2)]
    write_parquet_atomic(trajectories_to_arrow([traj(orig, 0, False, 1)]),
                         str(tmp_path / "parquet/rollouts/001.parquet"))
    write_parquet_atomic(trajectories_to_arrow(rolled), str(tmp_path / "parquet/rollouts/002.parquet"))
    rows1 = [{"index": 0, "parent_task_id": "t/1", "task_id": "syn/001/0", "kept": True, "reason": ""},
             {"index": 1, "parent_task_id": "t/1", "task_id": "syn/001/1", "kept": True, "reason": ""},
             {"index": 2, "parent_task_id": "t/1", "kept": False, "reason": "parse", "parse_error": "bad-pointer"},
             {"index": 3, "parent_task_id": "t/1", "kept": False, "reason": "duplicate"}]
    rows2 = [{"index": 0, "parent_task_id": "t/1", "kept": False, "reason": "trivial", "task_id": "syn/002/a"}]
    write_parquet_atomic(proposals_table(1, rows1), str(tmp_path / "parquet/task_proposals/001.parquet"))
    write_parquet_atomic(proposals_table(2, rows2), str(tmp_path / "parquet/task_proposals/002.parquet"))
    got = json.loads(run_query(tmp_path, "select * from curriculum order by iteration", fmt="json"))
    assert [(r["iteration"], r["proposals"], r["parsed"], r["kept"], r["drop_parse"], r["drop_duplicate"],
             r["drop_trivial"]) for r in got] == [(1, 4, 3, 2, 1, 1, 0), (2, 1, 1, 0, 0, 0, 1)]
    assert [r["parse_rate"] for r in got] == [0.75, 1.0]
    assert [(r["synthetic_rolled_out"], r["synthetic_episodes"]) for r in got] == [(0, 0), (2, 3)]
    assert got[0]["synthetic_success_rate"] is None and abs(got[1]["synthetic_success_rate"] - 2 / 3) < 1e-9


# --- issue 27 item 7: read-only, and nothing outside the data root, enforced by DuckDB too ---

@pytest.fixture
def outside(data_dir, tmp_path):
    import pyarrow.parquet as pq

    secret = tmp_path / "secret.parquet"
    pq.write_table(pa.table({"token": ["s3cr3t"]}), secret)
    (tmp_path / "secret.csv").write_text("token\ns3cr3t\n")
    return tmp_path


@pytest.mark.parametrize("sql", [
    "select * from read_parquet('{o}/secret.parquet')",
    "select * from '{o}/secret.parquet'",
    "select * from read_csv('{o}/secret.csv')",
    "select * from read_text('{o}/secret.csv')",
    "select * from read_blob('{o}/secret.csv')",
    "select * from glob('{o}/*')",
    "select * from read_parquet('{root}/parquet/../../secret.parquet')",
])
def test_cannot_read_outside_the_data_root(data_dir, outside, sql):
    with pytest.raises(ValueError, match="Permission Error"):
        run_query(data_dir[0], sql.format(o=outside, root=data_dir[0]))


@pytest.mark.parametrize("sql", [
    "copy (select 1 a) to '{o}/out.csv'",
    "copy (select 1 a) to '{root}/parquet/new.parquet'",
    "attach '{o}/new.duckdb' as other",
    "export database '{o}/dump'",
    "install httpfs",
    "load httpfs",
    "set enable_external_access = true",
    "set allowed_directories = ['/']",
    "reset lock_configuration",
])
def test_duckdb_itself_refuses_writes_attach_and_settings(data_dir, outside, sql):
    """The second layer: statements the SELECT-only check would already refuse, run on the sandboxed
    connection directly (as if that check had a hole)."""
    import duckdb

    from dreamgym_core.sql import sandboxed_connection

    con, views = sandboxed_connection(data_dir[0])
    assert "rollouts" in views and con.sql("select count(*) from rollouts").fetchone()[0] > 0
    with pytest.raises((duckdb.PermissionException, duckdb.InvalidInputException)):
        con.execute(sql.format(o=outside, root=data_dir[0]))
    assert not (outside / "out.csv").exists() and not (outside / "new.duckdb").exists()
    assert not (data_dir[0] / "parquet" / "new.parquet").exists() and not (outside / "dump").exists()


def test_cli_refuses_attach_and_writes_before_running(data_dir, outside):
    for sql in (f"attach '{outside}/x.duckdb'", f"copy rollouts to '{outside}/x.csv'", "set threads = 1"):
        with pytest.raises(ValueError, match="only SELECT"):
            run_query(data_dir[0], sql)


def test_a_symlink_out_of_the_root_is_not_a_view(tmp_path, outside):
    root = tmp_path / "data"
    write_parquet_atomic(pa.table({"a": [1]}), str(root / "parquet" / "inside.parquet"))
    (root / "parquet" / "leak.parquet").symlink_to(outside / "secret.parquet")
    (root / "parquet" / "leakdir").symlink_to(outside)
    views = json.loads(run_query(root, "select count(*) n from inside", fmt="json"))
    assert views == [{"n": 1}]
    with pytest.raises(ValueError, match="leak"):
        run_query(root, "select * from leak")
