"""The benchmarks' CPU smoke runs: they keep working between GPU sessions."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_load_times_every_path_on_the_same_weights(tmp_path):
    out = tmp_path / "load.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_load.py"), "--dir", str(tmp_path / "w"), "--layers", "1",
         "--width-div", "16", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["convert"]["dtype"] == "bf16"
    rows = report["paths"]
    assert [r["path"] for r in rows] == ["upstream", "ours", "ours-pt", "ours-noprefetch"]
    assert all("error" not in r and r["ready_s"] > 0 for r in rows), rows
    # Four loaders, one set of weights.
    assert len({r["checksum"] for r in rows}) == 1
    assert rows[1]["prefetched_gib"] > 0 and rows[3]["prefetched_gib"] == 0
    assert "checksums differ" not in result.stdout
