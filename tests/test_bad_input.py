"""Issue 27 item 6: a corpus of malformed inputs across import, checkpoints and run config.

Each case must fail with a one-line error that names the file / row / field (Dagster's own run
config errors: the first line names the field), and must write nothing.
"""

import json
import os
import shutil

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dreamgym_core import importer
from dreamgym_core.importer import TrajectoryImportError, import_file
from dreamgym_core.models import TinyLlamaConfig, build_tiny_llama, load_checkpoint, save_checkpoint, train_tokenizer
from pipelines.io_managers import CheckpointIOManager

REQUIRED = ["traj_id", "task_id", "step_idx", "state", "action", "next_state", "reward", "done"]


def _row(traj="t1", step=0, **kw):
    return {"traj_id": traj, "task_id": "web/1", "step_idx": step, "state": f"page {step}",
            "action": f"click {step}", "next_state": f"page {step + 1}", "reward": 0.0, "done": False} | kw


def _rows():
    return [_row("t1", 0), _row("t1", 1, reward=1.0, done=True)]


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _with(**kw):
    rows = _rows()
    rows[1] = rows[1] | kw
    return _jsonl(rows)


def _without(field):
    rows = _rows()
    del rows[0][field]
    return _jsonl(rows)


def _pq(table):
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


GOOD_PQ = _pq(pa.Table.from_pylist(_rows()))

# (case id, file name, content, expected text in the error)
IMPORT_CASES = [(f"missing-{f}", "x.jsonl", _without(f), f"field '{f}': required field is missing") for f in REQUIRED] + [
    ("unknown-field", "x.jsonl", _with(colour="red"), "field 'colour': unknown field"),
    ("step-as-string", "x.jsonl", _with(step_idx="1"), "field 'step_idx': expected an int"),
    ("step-as-float", "x.jsonl", _with(step_idx=1.0), "field 'step_idx': expected an int"),
    ("negative-step", "x.jsonl", _with(step_idx=-1), "field 'step_idx'"),
    ("reward-bool", "x.jsonl", _with(reward=True), "field 'reward': expected a finite number"),
    ("reward-nan", "x.jsonl", _jsonl(_rows()).replace(b'"reward": 1.0', b'"reward": NaN'), "field 'reward'"),
    ("reward-inf", "x.jsonl", _jsonl(_rows()).replace(b'"reward": 1.0', b'"reward": Infinity'), "field 'reward'"),
    ("done-string", "x.jsonl", _with(done="yes"), "field 'done': expected a bool"),
    ("blank-traj", "x.jsonl", _with(traj_id="  "), "field 'traj_id': must not be blank"),
    ("blank-action", "x.jsonl", _with(action=""), "field 'action': must not be blank"),
    ("bad-split", "x.jsonl", _with(split="bogus"), "field 'split': must be one of"),
    ("bad-action-kind", "x.jsonl", _with(action_kind="bogus"), "field 'action_kind'"),
    ("candidates-not-list", "x.jsonl", _with(candidates="a, b"), "field 'candidates': expected a list"),
    ("candidates-ints", "x.jsonl", _with(candidates=[1, 2]), "field 'candidates'"),
    ("candidates-too-many", "x.jsonl", _with(candidates=["go"] * 1001), "over the limit of 1,000"),
    ("state-50MB", "x.jsonl", _with(state="x" * 50_000_000), "field 'state': 50,000,000 characters, over the limit"),
    ("action-over-limit", "x.jsonl", _with(action="y" * 200_001), "field 'action': 200,001 characters"),
    ("null-value", "x.jsonl", _with(game=None), "field 'game'"),
    ("invalid-json", "x.jsonl", _jsonl(_rows())[:-20] + b"\n", "invalid JSON"),
    ("json-array", "x.jsonl", b'[1, 2]\n', "expected a JSON object"),
    ("duplicate-key", "x.jsonl", b'{"traj_id": "a", "traj_id": "b"}\n', "duplicate key"),
    ("invalid-utf8", "x.jsonl", b'{"traj_id": "\xff"}\n', "not valid UTF-8"),
    ("blank-line-mid", "x.jsonl", _jsonl(_rows()[:1]) + b"\n" + _jsonl(_rows()[1:]), "blank line followed by more"),
    ("empty-file", "x.jsonl", b"", "no rows"),
    ("duplicate-step", "x.jsonl", _jsonl(_rows() + _rows()[:1]), "duplicate step 0"),
    ("won-not-done", "x.jsonl", _jsonl([_row("t1", 0, won=True), _row("t1", 1, done=True)]), "won is true but done"),
    ("won-and-lost", "x.jsonl", _with(won=True, lost=True), "won and lost are both true"),
    ("task-disagrees", "x.jsonl", _with(task_id="web/2"), "field 'task_id'"),
    ("csv-extension", "x.csv", b"a,b\n", "unsupported extension '.csv'"),
    ("parquet-garbage", "x.parquet", os.urandom(256), "not a readable Parquet file"),
    ("parquet-truncated", "x.parquet", GOOD_PQ[: len(GOOD_PQ) // 2], "not a readable Parquet file"),
    ("parquet-wrong-type", "x.parquet", _pq(pa.Table.from_pylist(_rows()).set_column(
        2, "step_idx", pa.array(["0", "1"]))), "field 'step_idx': column has Arrow type string"),
    ("parquet-unknown-column", "x.parquet", _pq(pa.Table.from_pylist(_rows()).append_column(
        "colour", pa.array(["r", "g"]))), "field 'colour': unknown field"),
    ("parquet-missing-column", "x.parquet", _pq(pa.Table.from_pylist(_rows()).drop_columns(["reward"])),
     "field 'reward': required column is missing"),
]


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg and len(msg) < 600, msg[:800]
    return msg


@pytest.mark.parametrize("case,name,content,expected", IMPORT_CASES, ids=[c[0] for c in IMPORT_CASES])
def test_bad_import_file(tmp_path, case, name, content, expected):
    src = tmp_path / name
    src.write_bytes(content)
    dest = tmp_path / "data" / "parquet" / "imported_trajectories" / "x.parquet"
    with pytest.raises(TrajectoryImportError) as info:
        import_file(src, str(dest))
    msg = _one_line(info.value)
    assert msg.startswith(str(src)) and expected in msg, msg
    assert not (tmp_path / "data").exists()                          # nothing written, not even the folder


def test_missing_and_oversized_files(tmp_path, monkeypatch):
    dest = tmp_path / "data" / "x.parquet"
    with pytest.raises(TrajectoryImportError, match="no such file"):
        import_file(tmp_path / "nope.jsonl", str(dest))
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(TrajectoryImportError, match="not a regular file"):
        import_file(tmp_path / "dir.jsonl", str(dest))
    (tmp_path / "big.jsonl").write_bytes(_jsonl(_rows()))
    monkeypatch.setattr(importer, "MAX_FILE_BYTES", 100)
    with pytest.raises(TrajectoryImportError, match="over the limit of 100 ") as info:
        import_file(tmp_path / "big.jsonl", str(dest))
    _one_line(info.value)
    monkeypatch.setattr(importer, "MAX_FILE_BYTES", 10 ** 9)
    monkeypatch.setattr(importer, "MAX_ROWS", 1)
    with pytest.raises(TrajectoryImportError, match="2 rows, over the limit of 1"):
        import_file(tmp_path / "big.jsonl", str(dest))
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    tok = train_tokenizer(["go north", "take apple", "open fridge"] * 20, str(root / "tok"), vocab_size=300)
    model = build_tiny_llama(tok, TinyLlamaConfig(hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32))
    return save_checkpoint(model, tok, str(root / "good"), {"step": 1})


def _broken_copy(ckpt, tmp_path, breaker):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    breaker(bad)
    return bad


def _truncate(f):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


CKPT_CASES = [
    ("safetensors-truncated", lambda d: _truncate(d / "model.safetensors"), "cannot load causal LM"),
    ("safetensors-header-only", lambda d: (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
     "cannot load causal LM"),
    ("safetensors-missing", lambda d: (d / "model.safetensors").unlink(), "cannot load causal LM"),
    ("config-missing", lambda d: (d / "config.json").unlink(), "cannot load causal LM"),
    ("config-not-json", lambda d: (d / "config.json").write_text("{"), "cannot load causal LM"),
    ("metadata-not-json", lambda d: (d / "dreamgym.json").write_text("{oops"), "dreamgym.json: not valid JSON"),
    ("metadata-a-list", lambda d: (d / "dreamgym.json").write_text("[1]"), "dreamgym.json: expected a JSON object"),
]


@pytest.mark.parametrize("case,breaker,expected", CKPT_CASES, ids=[c[0] for c in CKPT_CASES])
def test_bad_checkpoint(ckpt, tmp_path, case, breaker, expected):
    bad = _broken_copy(ckpt, tmp_path, breaker)
    before = sorted(os.listdir(bad))
    with pytest.raises(ValueError) as info:
        load_checkpoint(str(bad))
    assert expected in _one_line(info.value)
    assert sorted(os.listdir(bad)) == before


class _Ctx:
    """The slice of dg.InputContext the checkpoint IO manager reads."""

    def __init__(self, key):
        self.asset_key, self.has_asset_partitions, self.dagster_type = dg.AssetKey(key), False, None


MANIFEST_CASES = [
    ("points-nowhere", lambda ck: json.dumps({"path": "/nonexistent/ckpt", "kind": "policy"}), "does not exist"),
    ("not-json", lambda ck: "{", "manifest is not valid JSON"),
    ("a-list", lambda ck: "[]", "manifest must be a JSON object"),
    ("unknown-field", lambda ck: json.dumps({"path": ck, "kind": "policy", "weights": 1}), "unknown: ['weights']"),
    ("missing-path", lambda ck: json.dumps({"kind": "policy"}), "missing: ['path']"),
    ("path-not-string", lambda ck: json.dumps({"path": 3, "kind": "policy"}), "'path' must be a string"),
]


@pytest.mark.parametrize("case,content,expected", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_bad_manifest(ckpt, tmp_path, case, content, expected):
    base = tmp_path / "checkpoints"
    (base / "policy_init").mkdir(parents=True)
    (base / "policy_init" / "manifest.json").write_text(content(ckpt))
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        CheckpointIOManager(base_dir=str(base)).load_input(_Ctx("policy_init"))
    assert expected in _one_line(info.value) and "manifest.json" in str(info.value)
    assert os.listdir(base / "policy_init") == ["manifest.json"]


# ---------------------------------------------------------------- run config

class StageConfig(dg.Config):
    budget: int = 10
    algorithm: str = "grpo"


@dg.asset
def stage(config: StageConfig) -> None:
    raise AssertionError("must not run with a bad config")


RUN_CONFIG_CASES = [
    ("unknown-op-field", {"ops": {"stage": {"config": {"budgett": 5}}}}, "budgett"),
    ("wrong-type", {"ops": {"stage": {"config": {"budget": "ten"}}}}, "budget"),
    ("unknown-op", {"ops": {"nope": {"config": {}}}}, "nope"),
    ("config-not-a-dict", {"ops": {"stage": {"config": 5}}}, "stage"),
]


@pytest.mark.parametrize("case,run_config,expected", RUN_CONFIG_CASES, ids=[c[0] for c in RUN_CONFIG_CASES])
def test_bad_run_config(tmp_path, case, run_config, expected):
    from pipelines.io_managers import ParquetIOManager

    with pytest.raises(dg.DagsterInvalidConfigError) as info:
        dg.materialize([stage], run_config=run_config,
                       resources={"io_manager": ParquetIOManager(base_dir=str(tmp_path / "parquet"))})
    first = str(info.value).strip().splitlines()
    assert any(expected in line for line in first[:6]), first[:6]
    assert not (tmp_path / "parquet").exists()


def test_bad_core_config_is_one_line():
    from dreamgym_core.loop import LoopConfig

    with pytest.raises(ValueError) as info:
        LoopConfig(group_size=0)
    assert "LoopConfig.group_size must be >= 1" in _one_line(info.value)
    with pytest.raises(TypeError, match="unexpected keyword argument 'group_sise'"):
        LoopConfig(group_sise=2)


def test_the_corpus_has_at_least_40_cases():
    assert len(IMPORT_CASES) + len(CKPT_CASES) + len(MANIFEST_CASES) + len(RUN_CONFIG_CASES) + 2 >= 40
