"""`make demo`'s serve step: start `moekit serve` on the demo model, ask it through the official openai client, stop it.

It is what a user does by hand (docs/serving.md): `moekit serve demo/model --budget 6MiB`, then point an OpenAI client
at http://127.0.0.1:PORT/v1. Here the port is the one the server picked (--port 0), read from its first line; the
server is stopped at the end whatever happens.

    python demo/serve_demo.py [MODEL] [--budget 6MiB]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

from openai import OpenAI  # a dev dependency, in requirements.lock

START_S = 180  # the first start builds the expert store


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="demo/model")
    ap.add_argument("--budget", default="6MiB")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "moekit", "serve", args.model, "--budget", args.budget, "--port", "0"]
    print("$", " ".join(cmd[2:]), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = _wait_ready(proc)
        client = OpenAI(base_url=url + "/v1", api_key="unused")  # loopback without --api-key: no key checked
        model = client.models.list().data[0].id
        prompt = "def fibonacci(n):"
        print(f"POST {url}/v1/completions (streamed, model {model!r}, prompt {prompt!r}):", flush=True)
        stream = client.completions.create(model=model, prompt=prompt, stream=True, max_tokens=40, temperature=0.7,
                                           seed=0)
        print(prompt, end="", flush=True)
        for chunk in stream:
            print(chunk.choices[0].text, end="", flush=True)
        print()
        counts = {"hits": 0.0, "misses": 0.0}  # summed over layers, from the Prometheus text
        for line in _get(url + "/metrics")[1].splitlines():
            m = re.match(r"moekit:expert_cache_(hits|misses)_total\{.*\} (\S+)$", line)
            if m:
                counts[m.group(1)] += float(m.group(2))
        looked = counts["hits"] + counts["misses"]
        print(f"/metrics: {looked:.0f} expert look-ups, hit rate {counts['hits'] / max(looked, 1):.2f}")
        return 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_ready(proc: subprocess.Popen) -> str:
    """The server's URL once /health answers 200 (its first line names the port; 503 while the model loads)."""
    deadline, url = time.monotonic() + START_S, None
    while url is None:
        line = proc.stdout.readline()
        if not line or time.monotonic() > deadline:
            raise SystemExit(f"error: moekit serve did not start (exit {proc.poll()}): {line.strip()}")
        print(line, end="", flush=True)
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        url = m.group(1) if m else None
    while _get(url + "/health")[0] != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"error: moekit serve stopped before it was ready (exit {proc.poll()})")
        time.sleep(0.2)
    return url


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:  # 503 while loading
        return e.code, ""


if __name__ == "__main__":
    raise SystemExit(main())
