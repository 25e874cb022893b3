"""kill -9 during every command that writes something lasting (trace, prune, merge, quantize, the expert-store build of
`moekit run`): afterwards nothing looks complete when it is not, and the same command run again succeeds and writes
exactly what an uninterrupted run writes.

Kill points per command (tests/processes.py): SIGKILL at three exact points, the first, a middle and the last
os.replace (every atomic write ends with one; the last is the rename that publishes the output), else a middle or the
first os.fsync (a file written, not yet renamed), and after a random delay within the uninterrupted run's duration
(anywhere: mid-computation, mid-write). The exact points always land before the run completes, so every command is
really interrupted at least three times."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moekit.trace
from tests.processes import run
from tests.trace.helpers import save_checkpoint
from tests.trace.test_resume import assert_same_trace

SEED = random.randrange(2**32)  # printed on failure: rerun with MOEKIT_KILL_SEED to replay the random delays


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    ckpt = save_checkpoint(root / "ckpt")
    text = root / "long.txt"
    text.write_text("\n<|endoftext|>\n".join(f"Document {i}: " + "the cat sat on the mat, " * 10 for i in range(12)))
    return {"ckpt": str(ckpt), "text": str(text)}


@dataclass(frozen=True)
class Command:
    argv: callable  # (inputs, work folder) -> argv
    output: str  # what it writes, inside the work folder
    complete: callable  # (output path) -> whether the output claims to be complete

    def path(self, work: Path) -> Path:
        return work / self.output


def _checkpoint_complete(out: Path) -> bool:
    return out.exists()


def _trace_complete(out: Path) -> bool:
    manifest = out / "manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text())["completed"]


def _store_complete(store: Path) -> bool:
    return (store / "manifest.json").is_file()


COMMANDS = {
    "trace": Command(lambda i, w: ["trace", i["ckpt"], "--data", i["text"], "--out", str(w / "t"), "--seq-len", "16",
                                   "--chunk-tokens", "48", "--batch-size", "3", "--resume", "--json"],
                     "t", _trace_complete),
    "prune": Command(lambda i, w: ["prune", i["ckpt"], "--keep", "8", "--method", "frequency", "--calib", i["text"],
                                   "--out", str(w / "out"), "--max-tokens", "128", "--seq-len", "32", "--json"],
                     "out", _checkpoint_complete),
    "merge": Command(lambda i, w: ["merge", i["ckpt"], "--groups", "8", "--calib", i["text"], "--out",
                                   str(w / "out"), "--calib-tokens", "128", "--seq-len", "32", "--json"],
                     "out", _checkpoint_complete),
    "quantize": Command(lambda i, w: ["quantize", i["ckpt"], "--avg-bits", "2.5", "--method", "pmq", "--calib",
                                      i["text"], "--out", str(w / "out"), "--calib-tokens", "128", "--seq-len", "32",
                                      "--group-size", "16", "--json"],
                        "out", _checkpoint_complete),
    "store build (run)": Command(lambda i, w: ["run", i["ckpt"], "--prompt", "the cat", "--store", str(w / "store"),
                                               "--budget", "100KB", "--max-new-tokens", "4", "--json"],
                                 "store", _store_complete),
}


def assert_same_output(name: str, got: Path, ref: Path) -> None:
    """The rerun wrote what the uninterrupted run wrote: the same files, every tensor equal, traces equal."""
    if name == "trace":
        assert_same_trace(moekit.trace.open(got), moekit.trace.open(ref))
        return
    files = lambda p: sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file())  # noqa: E731
    assert files(got) == files(ref)
    for f in ref.rglob("*.safetensors"):
        a, b = load_file(f), load_file(got / f.relative_to(ref))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{f.name} differs"


def assert_nothing_false(name: str, out: Path, ref: Path) -> None:
    """Whatever the kill left: either nothing under the output's name, or an output that is really complete, or (a
    trace or a store) a folder that says it is incomplete and whose listed parts are all sound."""
    if COMMANDS[name].complete(out):
        assert_same_output(name, out, ref)
    elif name == "trace" and (out / "manifest.json").is_file():
        moekit.trace.open(out).verify()  # every chunk the manifest lists is complete
    elif name != "trace" and name != "store build (run)":
        assert not out.exists()
    visible = [p.name for p in out.parent.iterdir() if not p.name.startswith(".")]
    assert set(visible) <= {COMMANDS[name].output, "log", "cache"}, visible


def kill_points(reference, rng: random.Random, exact: int = 3) -> list:
    """`exact` distinct points among the first, middle and last os.replace, then the middle and first os.fsync, and
    one random delay."""
    replaces, fsyncs = reference.calls["replace"], reference.calls["fsync"]
    candidates = [("replace", 1), ("replace", max(1, replaces // 2)), ("replace", replaces),
                  ("fsync", max(1, fsyncs // 2)), ("fsync", 1)]
    points = list(dict.fromkeys(p for p in candidates if p[1] <= reference.calls[p[0]]))[:exact]
    return points + [rng.uniform(0.1, 0.9) * reference.seconds]


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_kill_9_then_the_same_command_succeeds(name, inputs, tmp_path, monkeypatch):
    import os

    seed = int(os.environ.get("MOEKIT_KILL_SEED", SEED))
    command, env = COMMANDS[name], {"MOEKIT_CACHE": str(tmp_path / "cache")}
    ref_work = tmp_path / "ref"
    ref_work.mkdir()
    reference = run(command.argv(inputs, ref_work), ref_work / "log", env=env)
    assert reference.code == 0, reference.log
    ref = command.path(ref_work)
    interrupted = 0
    for i, point in enumerate(kill_points(reference, random.Random(f"{seed}-{name}"))):
        work = tmp_path / f"kill{i}"
        work.mkdir()
        where = {"kill_at": point} if isinstance(point, tuple) else {"kill_after": point}
        killed = run(command.argv(inputs, work), work / "log", env=env, **where)
        context = f"{name}, kill at {point} (seed {seed}): {killed.log[-2000:]}"
        assert killed.killed or killed.code == 0, context
        out = command.path(work)
        assert_nothing_false(name, out, ref)
        if command.complete(out):
            continue  # the random delay came after the end: the run is complete, nothing to redo
        interrupted += killed.killed
        again = run(command.argv(inputs, work), work / "log", env=env)
        assert again.code == 0, f"{context}\nrerun: {again.log[-2000:]}"
        assert_same_output(name, out, ref)
        assert not [p.name for p in work.iterdir() if p.name.startswith(".")], "a killed run's temporary files stayed"
        if name == "store build (run)":
            assert json.loads(again.log.splitlines()[-1])["text"] == json.loads(reference.log.splitlines()[-1])["text"]
    assert interrupted >= 3, f"{name}: only {interrupted} kills landed before the run completed"
