"""A real kill: `moekit trace` in a subprocess, SIGKILLed mid-run, then `--resume` -> the uninterrupted trace."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import moekit.trace
from moekit.cli import main
from tests.trace.helpers import save_checkpoint
from tests.trace.test_resume import assert_same_trace


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path):
    ckpt = save_checkpoint(tmp_path / "model")
    text = tmp_path / "long.txt"
    text.write_text("\n<|endoftext|>\n".join(f"Document {i}: " + "the cat sat on the mat, " * 12 for i in range(10)))
    args = ["trace", str(ckpt), "--data", str(text), "--seq-len", "32", "--chunk-tokens", "64", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "moekit", *args, "--out", str(tmp_path / "killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = tmp_path / "killed" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and len(json.loads(manifest.read_text())["chunks"]) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads(manifest.read_text())
    if state["completed"]:
        pytest.skip("the run finished before the kill landed")
    with pytest.raises(SystemExit) as exc:
        main([*args, "--out", str(tmp_path / "killed"), "--resume", "--json"])
    assert exc.value.code == 0
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "full"), "--json"])
    assert_same_trace(moekit.trace.open(tmp_path / "killed"), moekit.trace.open(tmp_path / "full"))
