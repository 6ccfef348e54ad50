"""Issue 27 item 1, slow tier: scripts/kill_anywhere.py end to end on a tiny demo (several minutes on CPU).

The demo is SIGKILLed at every fault point (inside a Parquet write, a checkpoint save, before a
manifest, between a Lance delete and add) and once at a random time, resumed each time, and must
end equal to an uninterrupted run, with no unreadable file, no changed finished output, no lost
Lance rows and no run left STARTED.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


@pytest.mark.slow
def test_kill_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "kill_anywhere.py"), "--out", str(tmp_path),
                           "--iterations", "1", "--random-kills", "1", "--seed", "1"],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=3600)
    report = json.loads((tmp_path / "kill_report.json").read_text())
    assert proc.returncode == 0 and report["ok"], proc.stdout[-3000:]
    assert report["kills_landed"] >= 5
    assert all(not k["visible_problems"] and not k["finished_outputs_changed"] and not k["lance_rows_lost"]
               for k in report["kills"])
    assert report["final"]["runs"].get("STARTED", 0) == 0 and report["final"]["runs"].get("FAILURE", 0) >= 5
    assert report["comparison"]["parquet_equal"] and not report["comparison"]["parquet_differ"]
