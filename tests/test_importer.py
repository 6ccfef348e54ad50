"""The trajectory importer: valid files round-trip; every malformed file fails on one line, writes nothing."""

import json
import os
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dreamgym_core.importer import FIELDS, ImportReport, TrajectoryImportError, import_file
from dreamgym_core.io import read_parquet
from dreamgym_core.schema import TRAJECTORY_ROWS_SCHEMA, RawObs, Task, Trajectory, Transition, trajectories_from_arrow


def _row(traj="t1", step=0, **kw):
    row = {"traj_id": traj, "task_id": "web/shop-1", "step_idx": step, "state": f"page {step}",
           "action": f"click {step}", "next_state": f"page {step + 1}", "reward": 0.0, "done": False}
    return row | kw


def _rows():
    """Two trajectories of one task: t1 wins in 2 steps, t2 ends without success in 2 steps."""
    return [_row("t1", 0), _row("t1", 1, reward=1.0, done=True),
            _row("t2", 0), _row("t2", 1, done=True)]


def _jsonl(rows, sep="\n"):
    return "".join(json.dumps(r) + sep for r in rows).encode()


def _lines(*lines):
    return "".join(line + "\n" for line in lines).encode()


def _parquet(table):
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _table(rows=None, **types):
    rows = _rows() if rows is None else rows
    return pa.table({k: pa.array([r[k] for r in rows], type=types.get(k)) for k in rows[0]})


def _with(i, **kw):
    rows = _rows()
    rows[i] = rows[i] | kw
    return _jsonl(rows)


def _without(i, field):
    rows = _rows()
    del rows[i][field]
    return _jsonl(rows)


def _raw_line(i, text):
    lines = [json.dumps(r) for r in _rows()]
    lines[i] = text
    return _lines(*lines)


def _reward_literal(i, literal):
    """Row i with its reward written as a raw JSON literal (NaN, Infinity... json.dumps would refuse)."""
    row = _rows()[i]
    text = json.dumps(row).replace(f'"reward": {row["reward"]}', f'"reward": {literal}')
    assert literal in text
    return _raw_line(i, text)


def _dest_folder_clean(out_dir, dest):
    assert not os.path.exists(dest)
    assert os.listdir(out_dir) == []  # no .tmp-* leftovers either


# --------------------------------------------------------------------------------------------
# Valid files

def _expected():
    task = Task(task_id="web/shop-1", env="webarena", game="shopping", split="dev", seed=7,
                instruction="buy a red mug", source="imported", initial_state="page 0")

    def step(traj, i, **kw):
        base = dict(traj_id=traj, task_id=task.task_id, env="webarena", step_idx=i, state=f"page {i}",
                    action=f"click {i}", next_state=f"page {i + 1}", reward=0.0, score=0.0, done=False,
                    won=False, lost=False, valid=True, action_kind="expert", source="imported",
                    policy="gpt-log", iteration=0)
        return Transition(**(base | kw))

    # obs / next_obs carry the score before and after the step (M_exp's progress reads them)
    t1 = Trajectory("t1", task, "gpt-log", (
        step("t1", 0, candidates=("click 0", "scroll"), valid=False, action_kind="invalid", score=0.25,
             next_obs=RawObs(score=0.25)),
        step("t1", 1, reward=1.0, score=1.0, done=True, won=True, obs=RawObs(score=0.25),
             next_obs=RawObs(score=1.0))))
    # t2's log stops before a done step: stored closed and truncated, like the collector does.
    t2 = Trajectory("t2", task, "gpt-log", (
        step("t2", 0), step("t2", 1, done=True, lost=False, iteration=3)), truncated=True)
    return [t1, t2]


def _valid_rows():
    common = {"task_id": "web/shop-1", "instruction": "buy a red mug", "game": "shopping", "split": "dev",
              "seed": 7, "policy": "gpt-log"}
    # Interleaved and out of order on purpose; env comes from the `env` argument; score, won and
    # the other optional fields take their defaults where left out.
    return [
        _row("t2", 1, iteration=3) | common,
        _row("t1", 1, reward=1, done=True) | common,
        _row("t1", 0, candidates=["click 0", "scroll"], valid=False, action_kind="invalid",
             score=0.25) | common,
        _row("t2", 0) | common,
    ]


def _check_written(report, dest):
    assert report == ImportReport(rows=4, trajectories=2, successes=1, path=str(dest), truncated=1)
    table = read_parquet(str(dest))
    assert table.schema == TRAJECTORY_ROWS_SCHEMA
    back = {t.traj_id: t for t in trajectories_from_arrow(table)}
    exp = {t.traj_id: t for t in _expected()}
    assert back == exp
    assert back["t1"].won and back["t1"].ret == 1.0 and not back["t2"].won and back["t2"].truncated
    assert set(table.column("source").to_pylist()) == {"imported"}
    assert table.column("task_source").to_pylist() == ["imported"] * 4


def test_valid_jsonl_round_trips(tmp_path):
    src = tmp_path / "log.jsonl"
    src.write_bytes(_jsonl(_valid_rows(), sep="\r\n") + b"\n  \n\n")  # CRLF and trailing blank lines are fine
    dest = tmp_path / "out" / "imported.parquet"
    _check_written(import_file(str(src), str(dest), env="webarena"), dest)


def test_valid_parquet_round_trips(tmp_path):
    rows = _valid_rows()
    for r in rows:  # Parquet needs every column on every row: give the defaults explicitly
        r.setdefault("candidates", [])
        r.setdefault("valid", True)
        r.setdefault("action_kind", "expert")
        r.setdefault("iteration", 0)
        r.setdefault("score", float(r["reward"]))
    rows[1]["reward"] = 1.0
    src = tmp_path / "log.parquet"
    # Narrower Arrow types than the output schema are accepted (int32 ids, large strings).
    src.write_bytes(_parquet(_table(rows, seed=pa.int32(), step_idx=pa.int16(), state=pa.large_string())))
    dest = tmp_path / "out" / "imported.parquet"
    _check_written(import_file(str(src), str(dest), env="webarena"), dest)


def test_defaults_score_won_and_env(tmp_path):
    src = tmp_path / "log.jsonl"
    src.write_bytes(_jsonl([_row("a", 0, reward=2.5, done=True),
                            _row("b", 0, task_id="web/shop-2", done=True, lost=True, env="other")]))
    report = import_file(str(src), str(tmp_path / "o.parquet"))
    a, b = trajectories_from_arrow(read_parquet(report.path))
    # score defaults to reward, won to (done and reward > 0), env to the `env` argument.
    assert (a.steps[0].score, a.steps[0].won, a.steps[0].lost, a.task.env) == (2.5, True, False, "external")
    assert (b.steps[0].score, b.steps[0].won, b.steps[0].lost, b.task.env) == (0.0, False, True, "other")
    assert report.successes == 1 and report.truncated == 0


def test_failed_import_leaves_an_existing_dest_untouched(tmp_path):
    dest = tmp_path / "imported.parquet"
    src = tmp_path / "good.jsonl"
    src.write_bytes(_jsonl(_rows()))
    import_file(str(src), str(dest))
    before = dest.read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(_with(2, reward="x"))
    with pytest.raises(TrajectoryImportError):
        import_file(str(bad), str(dest))
    assert dest.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "good.jsonl", "imported.parquet"]


def test_blank_env_argument_is_a_caller_error(tmp_path):
    src = tmp_path / "good.jsonl"
    src.write_bytes(_jsonl(_rows()))
    with pytest.raises(ValueError, match="env must be"):
        import_file(str(src), str(tmp_path / "o.parquet"), env=" ")
    assert not (tmp_path / "o.parquet").exists()


# --------------------------------------------------------------------------------------------
# Malformed files: (file name, content or None for "do not create", substrings the message must hold)

def _truncated_parquet():
    data = _parquet(_table())
    return data[: len(data) // 2]


def _parquet_nan_reward():
    rows = _rows()
    rows[2]["reward"] = float("nan")
    return _parquet(_table(rows))


MALFORMED = [
    pytest.param("missing.jsonl", lambda: _without(1, "next_state"), ["row 2", "field 'next_state'", "missing"],
                 id="missing-required-field"),
    pytest.param("reward-str.jsonl", lambda: _with(2, reward="1.0"),
                 ["row 3", "field 'reward'", "expected a finite number, got str '1.0'"], id="reward-as-string"),
    pytest.param("reward-bool.jsonl", lambda: _with(1, reward=True), ["row 2", "field 'reward'", "bool true"],
                 id="reward-as-bool"),
    pytest.param("step-str.jsonl", lambda: _with(1, step_idx="1"), ["row 2", "field 'step_idx'", "str '1'"],
                 id="step-idx-int-as-string"),
    pytest.param("step-float.jsonl", lambda: _with(1, step_idx=1.5), ["row 2", "field 'step_idx'", "float 1.5"],
                 id="step-idx-fractional"),
    pytest.param("step-integral.jsonl", lambda: _with(1, step_idx=1.0), ["row 2", "field 'step_idx'", "float 1.0"],
                 id="step-idx-integral-float"),
    pytest.param("step-bool.jsonl", lambda: _with(0, step_idx=False), ["row 1", "field 'step_idx'", "bool false"],
                 id="step-idx-bool"),
    pytest.param("negative.jsonl", lambda: _with(0, step_idx=-1), ["row 1", "field 'step_idx'", "-1"],
                 id="negative-step-idx"),
    pytest.param("done-str.jsonl", lambda: _with(1, done="true"), ["row 2", "field 'done'", "expected a bool"],
                 id="done-as-string"),
    pytest.param("done-int.jsonl", lambda: _with(1, done=1), ["row 2", "field 'done'", "int 1"], id="done-as-int"),
    pytest.param("action-list.jsonl", lambda: _with(0, action=["go"]), ["row 1", "field 'action'", "list"],
                 id="action-as-list"),
    pytest.param("action-empty.jsonl", lambda: _with(3, action=""), ["row 4", "field 'action'", "blank"],
                 id="empty-action"),
    pytest.param("null.jsonl", lambda: _with(0, game=None), ["row 1", "field 'game'", "got null"],
                 id="null-optional-field"),
    pytest.param("empty.jsonl", lambda: b"", ["no rows"], id="empty-file"),
    pytest.param("blank.jsonl", lambda: b"\n  \r\n\t\n", ["no rows"], id="only-blank-lines"),
    pytest.param("blank-mid.jsonl", lambda: _raw_line(1, ""), ["row 2", "blank line followed by more data"],
                 id="blank-line-in-the-middle"),
    pytest.param("latin1.jsonl", lambda: _jsonl(_rows()[:1]) + b'{"traj_id": "caf\xe9"}\n',
                 ["row 2", "not valid UTF-8", "0xe9"], id="non-utf8-bytes"),
    pytest.param("bom.jsonl", lambda: b"\xef\xbb\xbf" + _jsonl(_rows()), ["row 1", "invalid JSON"], id="utf8-bom"),
    pytest.param("cut.jsonl", lambda: _raw_line(2, '{"traj_id": "t2", "task_id": '), ["row 3", "invalid JSON"],
                 id="invalid-json-line"),
    pytest.param("array.jsonl", lambda: _raw_line(1, json.dumps(list(_rows()[1].values()))),
                 ["row 2", "expected a JSON object, got an array"], id="json-array-instead-of-object"),
    pytest.param("dupkey.jsonl", lambda: _raw_line(0, json.dumps(_rows()[0])[:-1] + ', "reward": 1}'),
                 ["row 1", "field 'reward'", "duplicate key"], id="duplicate-json-key"),
    pytest.param("nan.jsonl", lambda: _reward_literal(3, "NaN"),
                 ["row 4", "field 'reward'", "expected a finite number, got NaN"], id="nan-reward"),
    pytest.param("inf.jsonl", lambda: _reward_literal(1, "Infinity"),
                 ["row 2", "field 'reward'", "got Infinity"], id="infinity-reward"),
    pytest.param("huge.jsonl", lambda: _reward_literal(1, "1e400"),
                 ["row 2", "field 'reward'", "got Infinity"], id="overflowing-reward"),
    pytest.param("ninf.jsonl", lambda: _with(0, score=float("-inf")), ["row 1", "field 'score'", "-Infinity"],
                 id="minus-infinity-score"),
    pytest.param("dup.jsonl", lambda: _jsonl(_rows() + [_row("t1", 0)]),
                 ["row 5", "field 'step_idx'", "rows 1 and 5"], id="duplicate-traj-step"),
    pytest.param("gap.jsonl", lambda: _with(3, step_idx=2),
                 ["row 4", "field 'step_idx'", "jumps from step 0 to step 2"], id="non-contiguous-step-idx"),
    pytest.param("start.jsonl", lambda: _jsonl(_rows()[:2] + [_row("t2", 1), _row("t2", 2, done=True)]),
                 ["row 3", "field 'step_idx'", "starts at step 1"], id="step-idx-not-from-zero"),
    pytest.param("early-done.jsonl", lambda: _with(0, done=True), ["row 1", "field 'done'", "only the last step"],
                 id="done-before-last-step"),
    pytest.param("won-not-done.jsonl", lambda: _with(2, won=True), ["row 3", "field 'won'", "done is false"],
                 id="won-without-done"),
    pytest.param("won-lost.jsonl", lambda: _with(1, lost=True), ["row 2", "field 'lost'", "both true"],
                 id="won-and-lost"),
    pytest.param("unknown.jsonl", lambda: _with(2, rewrd=1.0), ["row 3", "field 'rewrd'", "unknown field"],
                 id="unknown-field"),
    pytest.param("kind.jsonl", lambda: _with(1, action_kind="human"), ["row 2", "field 'action_kind'", "'human'"],
                 id="bad-action-kind"),
    pytest.param("split.jsonl", lambda: _jsonl([r | {"split": "validation"} for r in _rows()]),
                 ["row 1", "field 'split'", "train, dev, test"], id="bad-split"),
    pytest.param("cands.jsonl", lambda: _with(0, candidates=["look", 3]), ["row 1", "field 'candidates'", "item 1"],
                 id="candidates-not-strings"),
    pytest.param("cands-str.jsonl", lambda: _with(0, candidates="look,go"), ["row 1", "field 'candidates'", "list"],
                 id="candidates-not-a-list"),
    pytest.param("surrogate.jsonl", lambda: _raw_line(0, json.dumps(_rows()[0]).replace("page 0", "\\ud800")),
                 ["row 1", "field 'state'", "surrogate"], id="lone-surrogate"),
    pytest.param("mixed-task.jsonl", lambda: _with(1, task_id="web/other"), ["row 2", "field 'task_id'", "row 1"],
                 id="mixed-task-id-in-trajectory"),
    pytest.param("mixed-instr.jsonl", lambda: _with(1, instruction="something else"),
                 ["row 2", "field 'instruction'", "trajectory 't1'"], id="mixed-instruction-in-trajectory"),
    pytest.param("task-disagrees.jsonl", lambda: _jsonl(_rows()[:2] + [r | {"seed": 3} for r in _rows()[2:]]),
                 ["row 3", "field 'seed'", "task 'web/shop-1'"], id="task-fields-disagree-across-trajectories"),
    pytest.param("cut.parquet", _truncated_parquet, ["not a readable Parquet file"], id="truncated-parquet"),
    pytest.param("text.parquet", lambda: _jsonl(_rows()), ["not a readable Parquet file"], id="jsonl-named-parquet"),
    pytest.param("reward-str.parquet", lambda: _parquet(_table([r | {"reward": str(r["reward"])} for r in _rows()])),
                 ["field 'reward'", "Arrow type string"], id="parquet-reward-column-string"),
    pytest.param("step-float.parquet", lambda: _parquet(_table(step_idx=pa.float64())),
                 ["field 'step_idx'", "Arrow type double", "expected an int"], id="parquet-step-idx-float-column"),
    pytest.param("no-done.parquet", lambda: _parquet(_table().drop_columns(["done"])),
                 ["field 'done'", "required column is missing"], id="parquet-missing-column"),
    pytest.param("extra.parquet", lambda: _parquet(_table().append_column("notes", pa.array(["x"] * 4))),
                 ["field 'notes'", "unknown field"], id="parquet-unknown-column"),
    pytest.param("nan.parquet", _parquet_nan_reward, ["row 2", "field 'reward'", "got NaN"], id="parquet-nan-reward"),
    pytest.param("empty.parquet", lambda: _parquet(_table().slice(0, 0)), ["no rows"], id="parquet-zero-rows"),
    pytest.param("log.csv", lambda: b"traj_id,task_id\n", ["unsupported extension '.csv'"], id="unsupported-extension"),
    pytest.param("absent.jsonl", None, ["no such file"], id="nonexistent-path"),
]


@pytest.mark.parametrize("name, content, expected", MALFORMED)
def test_malformed_file_is_rejected_on_one_line_and_writes_nothing(tmp_path, name, content, expected):
    src = tmp_path / "in" / name
    src.parent.mkdir()
    if content is not None:
        src.write_bytes(content())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dest = out_dir / "imported.parquet"
    with pytest.raises(TrajectoryImportError) as info:
        import_file(str(src), str(dest))
    message = str(info.value)
    assert len(message.splitlines()) == 1 and "\n" not in message
    assert message.startswith(str(src) + ": ")
    for part in expected:
        assert part in message, (part, message)
    _dest_folder_clean(out_dir, dest)


def test_there_are_enough_malformed_cases():
    assert len(MALFORMED) >= 24
    assert len({p.id for p in MALFORMED}) == len(MALFORMED)


def test_error_carries_its_parts(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(_with(2, reward=float("nan")))
    with pytest.raises(TrajectoryImportError) as info:
        import_file(str(src), str(tmp_path / "o.parquet"))
    e = info.value
    assert (e.path, e.row, e.field) == (str(src), 3, "reward")
    assert str(e) == f"{src}: row 3: field 'reward': expected a finite number, got NaN"


# --------------------------------------------------------------------------------------------
# Properties: whatever the input, the only failure is TrajectoryImportError and it writes nothing.

def _import_in_fresh_dir(content: bytes):
    """Returns (report or error, files left in the output folder)."""
    with tempfile.TemporaryDirectory() as d:
        src, out = os.path.join(d, "x.jsonl"), os.path.join(d, "out")
        os.mkdir(out)
        with open(src, "wb") as f:
            f.write(content)
        try:
            result = import_file(src, os.path.join(out, "x.parquet"))
        except TrajectoryImportError as exc:
            result = exc
        left = sorted(os.listdir(out))
        if isinstance(result, ImportReport):
            table = read_parquet(result.path)
            return result, left, trajectories_from_arrow(table)
        return result, left, None


def _check_outcome(result, left, trajs):
    if isinstance(result, TrajectoryImportError):
        assert len(str(result).splitlines()) == 1
        assert left == []
    else:
        assert left == ["x.parquet"]
        assert sum(len(t) for t in trajs) == result.rows and len(trajs) == result.trajectories
        for t in trajs:
            assert [s.step_idx for s in t.steps] == list(range(len(t)))
            assert t.steps[-1].done and not any(s.done for s in t.steps[:-1])


_PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_PROPERTY
@given(st.binary(max_size=400))
def test_arbitrary_bytes_only_raise_import_error_and_leave_no_file(content):
    _check_outcome(*_import_in_fresh_dir(content))


_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(2 ** 62, 2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
                    st.lists(st.one_of(st.text(max_size=3), st.integers(0, 1)), max_size=2),
                    st.sampled_from(["expert", "policy", "train", "test", ""]))
_DELETE = object()


@st.composite
def _logs(draw):
    """A valid two-trajectory log, shuffled, then 0-2 edits (set a field to a value, or delete it)."""
    rows = [_row("a", i, done=i == n - 1, reward=float(draw(st.booleans())) * (i == n - 1))
            for n in [draw(st.integers(1, 3))] for i in range(n)]
    rows += [_row("b", i, task_id="web/shop-2", done=i == 1) for i in range(draw(st.integers(0, 2)))]
    rows = draw(st.permutations(rows))
    edits = draw(st.lists(st.tuples(st.integers(0, len(rows) - 1), st.sampled_from(list(FIELDS) + ["extra"]),
                                    st.one_of(st.just(_DELETE), _values)), max_size=2))
    for i, field, value in edits:
        rows[i] = {k: v for k, v in rows[i].items() if k != field} | ({} if value is _DELETE else {field: value})
    return rows, bool(edits)


@_PROPERTY
@given(_logs())
def test_edited_valid_logs_either_import_consistently_or_fail_cleanly(log):
    rows, edited = log
    lines = "".join(json.dumps(r, allow_nan=True) + "\n" for r in rows).encode()
    result, left, trajs = _import_in_fresh_dir(lines)
    _check_outcome(result, left, trajs)
    if not edited:
        assert isinstance(result, ImportReport), result
    if isinstance(result, ImportReport):
        assert result.rows == len(rows)
