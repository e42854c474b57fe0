"""Loading streams tensors: peak memory stays near one checkpoint's worth (bench/load_memory.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "load_memory.py"


@pytest.mark.slow
def test_load_peak_memory_is_about_the_checkpoint_size():
    if not sys.platform.startswith("linux"):
        pytest.skip("ru_maxrss is read in KiB, as on Linux")
    if shutil.disk_usage(tempfile.gettempdir()).free < 3 * 10**9:
        pytest.skip("needs 3 GB of free disk in the temp dir")
    result = subprocess.run(
        [sys.executable, str(BENCH), "--size-gb", "0.5"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["checkpoint_bytes"] > 0.4 * 10**9
    assert figures["loaded_bytes"] >= 0.99 * figures["checkpoint_bytes"]
    assert figures["ratio"] <= 1.2, result.stdout
