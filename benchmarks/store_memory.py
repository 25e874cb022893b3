"""Memory and time of building an expert store from a checkpoint and of loading from it, against a plain
`from_pretrained` of the same checkpoint measured in the same run (docs/runtime.md quotes these numbers).

    .venv/bin/python benchmarks/store_memory.py [--work DIR] [--layers 4]

Checkpoint: benchmarks/offload.py's synthetic Qwen3-MoE (4.83 GB of float32 experts, 5.1 GB in all), made once in
--work. Each phase runs in a fresh Python process, so its peaks are its own: `build` (build_store_from_checkpoint into
an empty folder: the first `moekit run` of a checkpoint), `load` (load_from_store: every later run), `plain`
(AutoModelForCausalLM.from_pretrained, the baseline that holds every expert). Per phase: wall time, the peak of
anonymous resident memory (RssAnon of /proc/self/status, sampled every 2 ms by a thread: memory the process owns, which
is what a budget has to hold; file pages of an mmapped checkpoint are reclaimable and not in it), the kernel's exact
peak resident set (VmHWM, file-backed pages included), and the same figures after imports alone, to subtract.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("plain", "build", "load")


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


class PeakAnon:
    """Samples RssAnon in a background thread while the block runs."""

    def __init__(self, every_s: float = 0.002):
        self.every_s, self.peak, self._stop = every_s, status_bytes("RssAnon"), threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, status_bytes("RssAnon"))
            time.sleep(self.every_s)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_bytes("RssAnon"))


def phase(name: str, ckpt: Path, store: Path) -> dict:
    """One phase in this (fresh) process -> its measurements."""
    import torch
    import transformers  # noqa: F401  (imports are the baseline, not the phase)

    from moekit.runtime.checkpoint import build_store_from_checkpoint, load_from_store

    torch.set_num_threads(1)
    base = {"anon": status_bytes("RssAnon"), "hwm": status_bytes("VmHWM")}
    t0 = time.perf_counter()
    with PeakAnon() as peak:
        if name == "plain":
            model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype="auto")
        elif name == "build":
            shutil.rmtree(store, ignore_errors=True)
            build_store_from_checkpoint(ckpt, store)
        else:
            model = load_from_store(ckpt, store).model
    wall = time.perf_counter() - t0
    out = {"phase": name, "wall_s": wall, "peak_anon_bytes": peak.peak, "vm_hwm_bytes": status_bytes("VmHWM"),
           "imports_anon_bytes": base["anon"], "imports_hwm_bytes": base["hwm"]}
    if name != "build":
        out["resident_param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters()
                                          if p.device.type != "meta")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "moekit-bench")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # internal: one phase in a child process
    ap.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    store = args.work / "store-memory-benchmark"
    if args.phase:
        print(json.dumps(phase(args.phase, args.ckpt, store)))
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from offload import synthetic_checkpoint

    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = synthetic_checkpoint(args.work / f"synthetic-qwen3moe-{args.layers}l", args.layers)
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    load = os.getloadavg()[0]
    rows = []
    for name in PHASES:  # plain first: its page cache warms the checkpoint for build as it would for a user
        res = subprocess.run([sys.executable, __file__, "--phase", name, "--ckpt", str(ckpt), "--work", str(args.work)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    shutil.rmtree(store, ignore_errors=True)
    gb = 1e9
    print(f"checkpoint {ckpt}: {ckpt_bytes / gb:.2f} GB of weights; load average {load:.1f}")
    print(f"{'phase':<7}{'wall s':>8}{'peak anon GB':>14}{'(- imports)':>13}{'peak RSS GB':>13}"
          f"{'resident params GB':>20}")
    for r in rows:
        print(f"{r['phase']:<7}{r['wall_s']:>8.1f}{r['peak_anon_bytes'] / gb:>14.2f}"
              f"{(r['peak_anon_bytes'] - r['imports_anon_bytes']) / gb:>13.2f}{r['vm_hwm_bytes'] / gb:>13.2f}"
              f"{r.get('resident_param_bytes', 0) / gb:>20.2f}")
    plain, build = rows[0], rows[1]
    print(f"build's peak anonymous memory is {build['peak_anon_bytes'] / plain['peak_anon_bytes']:.2f} of a plain "
          f"from_pretrained's")
    print(json.dumps({"benchmark": "store_memory", "checkpoint": str(ckpt), "checkpoint_bytes": ckpt_bytes,
                      "load_average_1min": load, "rows": rows}))


if __name__ == "__main__":
    main()
