"""The Dagster UI in a real browser: the asset graph, the iteration partitions, an ordered backfill.

Starts `dagster dev` on 127.0.0.1 (the tiny profile), drives it with Playwright in headless Debian
chromium (`make test` installs the package), checks every stage is in the graph and the loop is
partitioned 001..., launches a backfill of iterations 001-002 by clicking, and waits until both
iterations succeeded, 002 starting only after 001 ended. Screenshots go to test-artifacts/.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
STAGES = ["seed_tasks", "eval_tasks", "offline_trajectories", "cot_annotations", "replay_seed", "experience_model",
          "experience_model_eval", "policy_init", "rollouts", "policy", "task_scores", "synthesized_tasks",
          "task_proposals", "task_pool", "replay_buffer", "iteration_eval", "s2r_policy", "real_rl_policy",
          "policy_eval"]
STAGES_LOOP = ["rollouts", "policy", "task_scores", "synthesized_tasks", "task_proposals", "task_pool", "replay_buffer",
               "iteration_eval"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gql(base: str, query: str, variables: dict | None = None) -> dict:
    req = urllib.request.Request(f"{base}/graphql", data=json.dumps({"query": query, "variables": variables or {}}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        out = json.load(r)
    if out.get("errors"):
        raise AssertionError(out["errors"])
    return out["data"]


def _prepare(data: Path, env: dict) -> None:
    """Iteration 0 with tiny models, in a subprocess with the server's DAGSTER_HOME (same run history)."""
    script = """
import dagster as dg
from pipelines.definitions import ALL_ASSETS, build_defs
defs = build_defs()
keys = ["seed_tasks", "eval_tasks", "offline_trajectories", "cot_annotations", "replay_seed", "experience_model", "policy_init"]
ops = {"experience_model": {"config": {"time_budget_s": 4.0, "hidden": 32, "layers": 1, "vocab_size": 400,
                                       "steps": 20, "batch_size": 4}},
       "policy_init": {"config": {"time_budget_s": 3.0, "hidden": 32, "layers": 1, "steps": 20}}}
with dg.DagsterInstance.get() as inst:
    for k in keys:
        r = dg.materialize(ALL_ASSETS, selection=[k], resources=defs.resources, instance=inst,
                           run_config={"ops": {k: ops[k]}} if k in ops else {})
        assert r.success, k
"""
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True, timeout=300,
                   capture_output=True, text=True)


@pytest.fixture
def dagster_ui(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian chromium is missing: `make test` installs it (apt-get install chromium)")
    data, home = tmp_path / "data", tmp_path / "dagster_home"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DREAMGYM_DATA": str(data), "DREAMGYM_PROFILE": "tiny", "DAGSTER_HOME": str(home),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        _prepare(data, env)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"preparing iteration 0 failed:\n{e.stderr[-3000:]}")
    port = _free_port()
    log = open(tmp_path / "dagster_dev.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dagster"), "dev", "-w", "workspace.yaml",
                             "-h", "127.0.0.1", "-p", str(port)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/server_info", timeout=2)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail(f"dagster dev did not start; log:\n{(tmp_path / 'dagster_dev.log').read_text()[-3000:]}")
                time.sleep(1)
        yield base, tmp_path
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _wait_backfill(base: str, timeout: float) -> list[dict]:
    q = """query { partitionBackfillsOrError(limit: 5) { __typename ... on PartitionBackfills { results {
             id status runs(limit: 20) { runId status startTime endTime tags { key value } } } } } }"""
    deadline = time.time() + timeout
    while time.time() < deadline:
        res = _gql(base, q)["partitionBackfillsOrError"]["results"]
        if res:
            bf = res[0]
            runs = bf["runs"]
            if bf["status"] in ("COMPLETED", "FAILED", "CANCELED", "COMPLETED_SUCCESS", "COMPLETED_FAILED") \
                    or (len(runs) >= 2 and all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in runs)):
                return runs
        time.sleep(3)
    raise AssertionError(f"backfill did not finish in {timeout:.0f}s")


def _goto(page, url: str) -> None:
    """Open a page and close the first-visit "Join the Dagster community" dialog if it shows."""
    page.goto(url, wait_until="networkidle")
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.first.click(timeout=4000)
    except Exception:  # no dialog on this visit
        pass


def test_graph_partitions_and_an_ordered_backfill_in_chromium(dagster_ui):
    from playwright.sync_api import expect, sync_playwright

    base, tmp = dagster_ui
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1800, "height": 1100})
        _goto(page, f"{base}/assets")
        for stage in STAGES:  # the catalog lists every stage as an asset
            expect(page.locator(f'a[href="/assets/{stage}"]').first).to_be_attached(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "ui_assets.png"), full_page=True)

        _goto(page, f"{base}/locations/dreamgym/asset-groups/dreamgym_loop")
        expect(page.get_by_text("20 partitions").first).to_be_visible(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "ui_loop_graph.png"))
        # the lineage graph renders only the nodes inside the viewport; the group's List tab names them all
        page.get_by_role("tab", name="List").click()
        for stage in STAGES_LOOP:
            expect(page.locator(f'a[href="/assets/{stage}"]').first).to_be_attached(timeout=30_000)

        _goto(page, f"{base}/assets/policy?view=partitions")
        expect(page.get_by_text(re.compile(r"\b001\b")).first).to_be_visible(timeout=30_000)

        _goto(page, f"{base}/locations/dreamgym/asset-groups/dreamgym_loop")
        page.get_by_role("button", name=re.compile("Materialize all")).first.click()
        box = page.get_by_placeholder(re.compile(r"ex: 001"))
        expect(box).to_be_visible(timeout=30_000)
        box.fill("[001...002]")
        page.keyboard.press("Tab")
        page.screenshot(path=str(ARTIFACTS / "ui_backfill_dialog.png"))
        page.get_by_role("button", name=re.compile("Launch backfill")).click()
        runs = _wait_backfill(base, timeout=900)
        _goto(page, f"{base}/assets/iteration_eval?view=partitions")
        page.screenshot(path=str(ARTIFACTS / "ui_after_backfill.png"), full_page=True)
        browser.close()
    by_part = {next(t["value"] for t in r["tags"] if t["key"] == "dagster/partition"): r for r in runs
               if any(t["key"] == "dagster/partition" for t in r["tags"])}
    assert set(by_part) == {"001", "002"}, runs
    assert all(r["status"] == "SUCCESS" for r in by_part.values()), \
        f"{runs}\n{(tmp / 'dagster_dev.log').read_text()[-3000:]}"
    assert by_part["002"]["startTime"] >= by_part["001"]["endTime"]
    # lineage in the files: iteration 002's rollouts were made by iteration 001's policy
    import duckdb

    data = tmp / "data" / "parquet" / "rollouts"
    got = duckdb.sql(f"select distinct iteration, policy from read_parquet('{data}/*.parquet') order by 1").fetchall()
    assert got == [(1, "sft"), (2, "dreamgym@001")]
