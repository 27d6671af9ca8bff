"""What the benchmarks measure of a child process: wall time, CPU seconds and memory of its whole tree."""

from __future__ import annotations

import sys

import pytest

from styledistill.tools.bench import run_measured

CHILD = """
import json, time
block = bytearray(300 * 2**20)  # touched (zero-filled): 300 MB resident
deadline = time.process_time() + 0.5
while time.process_time() < deadline:  # half a CPU second
    pass
time.sleep(0.5)  # still resident while the parent samples
print(json.dumps({"samples": 3, "wall_s": 1.0}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RSS high-water marks come from /proc")
def test_a_measured_child_reports_its_cpu_and_memory():
    result, peak_pss_mb = run_measured([sys.executable, "-c", CHILD])
    assert result["samples"] == 3 and result["process_s"] >= 1.0
    assert 0.4 <= result["cpu_s"] < 5
    assert 300 <= result["hwm_mb"] < 1000 and 300 <= peak_pss_mb < 1000
