"""One real `moekit serve` process on 127.0.0.1 (a free port) for the whole serve suite: the demo model with 8 of its
32 experts per layer cached, an API key, a small batch and queue (so the load test overflows it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package itself uses (its dependency)
import pytest

ROOT = Path(__file__).resolve().parents[2]
KEY = "test-key-123"
MAX_BATCH, MAX_QUEUE = 4, 8


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    store: Path
    first_health: int  # status of the first /health answer (while loading)
    log: list[str]

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=60, **kw)

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=30, **kw)

    def post(self, path: str, body=None, auth: bool = True, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}"} if auth else {}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=60, **kw)

    def metrics(self) -> dict[str, float]:
        """Sample name{labels} -> value, parsed by prometheus_client's own parser."""
        from prometheus_client.parser import text_string_to_metric_families

        out = {}
        for fam in text_string_to_metric_families(httpx.get(self.url + "/metrics", timeout=30).text):
            for s in fam.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("model_name", "engine"))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("serve-store")
    env = {**os.environ, "MOEKIT_CACHE": str(tmp_path_factory.mktemp("cache"))}
    cmd = [sys.executable, "-m", "moekit", "serve", str(ROOT / "demo" / "model"), "--port", "0", "--api-key", KEY,
           "--budget", "6MiB", "--store", str(store), "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE),
           "--max-step-tokens", "64", "--max-body-bytes", "65536", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    log: list[str] = []
    url = None
    deadline = time.monotonic() + 180
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        log.append(line)
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        url = m.group(1) if m else None
    assert url is not None, "the server did not start:\n" + "".join(log)
    threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()  # keep draining its output
    first = httpx.get(url + "/health", timeout=10).status_code
    while time.monotonic() < deadline and httpx.get(url + "/health", timeout=10).status_code != 200:
        assert proc.poll() is None, "the server died:\n" + "".join(log)
        time.sleep(0.2)
    srv = Server(url, proc, store, first, log)
    yield srv
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
