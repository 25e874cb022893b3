"""A full disk during any write: one `error:` line naming the file, exit code 2, no partial output, and the same
command succeeds once there is room again. Simulated per process with RLIMIT_FSIZE (SIGXFSZ ignored, so the write
fails with EFBIG as a full disk fails with ENOSPC; both take the same path, moekit.files.disk_errors), at two limits per
command: below the first file written, and half the size of the largest file of an uninterrupted run (the failure then
comes in the middle of the output)."""

from __future__ import annotations

import json
import shutil

import pytest
import moekit.trace
from tests.processes import run
from tests.test_kill import COMMANDS, assert_same_output, inputs  # noqa: F401  (the fixture)
from tests.trace.test_sglang import _per_token_dump

def _with_store(inputs: dict, work) -> str:
    """A copy of the built expert store in the work folder, for the low-bit build to write into."""
    if not (work / "store").exists():
        shutil.copytree(inputs["store"], work / "store")
    return str(work / "store")


EXTRA = {  # further writers, beyond the commands the kill test interrupts: (argv, output)
    "trace-import-sglang": (lambda i, w: ["trace-import-sglang", i["dump"], "--out", str(w / "t")], "t"),
    "analyze (report)": (lambda i, w: ["analyze", i["trace"], "--out", str(w / "report.html")], "report.html"),
    "low-bit copies (run --lowbit)": (lambda i, w: ["run", i["ckpt"], "--prompt", "the", "--store",
                                                    _with_store(i, w), "--lowbit", "4", "--max-new-tokens", "2",
                                                    "--json"], "store/lowbit4"),
}


@pytest.fixture(scope="module")
def more(inputs, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("disk")
    _per_token_dump(root / "dump.pt")
    moekit.trace.record(inputs["ckpt"], [inputs["text"]], root / "trace")
    from moekit.runtime.checkpoint import build_store_from_checkpoint

    return {**inputs, "dump": str(root / "dump.pt"), "trace": str(root / "trace"),
            "store": str(build_store_from_checkpoint(inputs["ckpt"], root / "store"))}


def _largest_file(path) -> int:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return max(f.stat().st_size for f in files)


def _argv_and_output(name: str, inputs: dict, work):
    if name in COMMANDS:
        return COMMANDS[name].argv(inputs, work), COMMANDS[name].output
    argv, output = EXTRA[name]
    return argv(inputs, work), output


@pytest.mark.slow
@pytest.mark.parametrize("name", [*COMMANDS, *EXTRA])
def test_full_disk_gives_one_line_and_no_partial_output(name, more, tmp_path):
    env = {"MOEKIT_CACHE": str(tmp_path / "cache")}
    ref_work = tmp_path / "ref"
    ref_work.mkdir()
    argv, output = _argv_and_output(name, more, ref_work)
    reference = run(argv, ref_work / "log", env=env)
    assert reference.code == 0, reference.log
    largest = _largest_file(ref_work / output)
    for limit in (600, largest // 2):
        work = tmp_path / f"limit{limit}"
        work.mkdir()
        argv, output = _argv_and_output(name, more, work)
        full = run(argv, work / "log", env=env, fsize=limit)
        context = f"{name} with files limited to {limit} bytes: {full.log[-6000:]}"
        assert full.code == 2 and "Traceback" not in full.log, context
        assert len(full.error_lines) == 1 and "file-size limit" in full.error_lines[0], context
        leftovers = [p.name for p in work.rglob(".*")] + [p.name for p in work.rglob("*.tmp")]
        assert not leftovers, f"{context}\ntemporary files left: {leftovers}"
        out = work / output
        if name == "trace" and out.exists():  # a trace keeps its complete chunks for --resume; it says so
            manifest = json.loads((out / "manifest.json").read_text())
            assert not manifest["completed"]
            moekit.trace.open(out).verify()
        elif name.startswith(("store build", "low-bit")):
            assert not (out / "manifest.json").exists()
        else:
            assert not out.exists(), context
        if limit == 600:
            continue  # failed at the first write; the run again is tried once, after a failure mid-output
        again = run(argv, work / "log", env=env)
        assert again.code == 0, f"{context}\nagain: {again.log[-2000:]}"
        if output != "report.html":
            assert_same_output("trace" if name == "trace" else "checkpoint", out, ref_work / output)
