"""E8: the file tier under kill -9.

Four writers ``Cache.set`` self-checking values while one of them is SIGKILLed every U(5, 50) ms
(quick mode 8 s, ZEAL_TEST_LONG=1: 20 s).  Then a few entry files are torn on purpose (what a
power cut without fsync can leave), the server "restarts" (a new process) and reads every key
once plus 800 random ones.  Pass: 0 wrong values, every damaged file read is a miss, no temp
file left after the start-up cleanup.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests._harness.apps import REPO
from tests.cache.conftest import SECRET, entry_files, temp_files
from tests.conftest import quick_or_long

TORN = 5


def _run(*args: str, timeout: float) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZEAL_")}
    env.update(PYTHONPATH=str(REPO), ZEAL_SHM_BACKEND="memfd", ZEAL_CACHE_SECRET=SECRET)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.cache._killed_writers", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def test_e8_no_wrong_value_after_kill_9_and_restart(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    seconds = quick_or_long(8.0, 20.0)
    killed = _run("kill", str(directory), str(seconds), timeout=seconds + 60)
    temp_before = len(temp_files(directory))
    files = entry_files(directory)
    for f in random.Random(3).sample(files, TORN):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    read = _run("read", str(directory), timeout=120)
    print(
        f"\nE8 kill phase: {killed['kills']} SIGKILLs in {seconds:.0f} s, {killed['puts']} puts "
        f"acknowledged, {temp_before} temp files left by the kills, {TORN} files torn on purpose"
    )
    print(
        f"E8 restart: {read['temp_removed_at_start']} temp files removed at start, "
        f"{read['temp_files_after_start']} left; {read['reads']} reads: {read['hits']} hits, "
        f"{read['misses']} misses, {read['wrong']} wrong values; damaged detected "
        f"{read['damaged_detected']}; get p99 {read['get_p99_us']} us, put p99 "
        f"{read['put_p99_us']} us"
    )
    assert killed["kills"] >= 50 and killed["puts"] >= 500
    assert read["wrong"] == 0
    assert read["temp_files_after_start"] == 0
    assert read["temp_removed_at_start"] == temp_before
    assert sum(read["damaged_detected"].values()) == TORN  # every torn file read was a miss
    assert read["hits"] >= 500
