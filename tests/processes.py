"""`moekit ARGS` in real child processes, started in milliseconds: each is forked from a server process that imported
moekit, torch and transformers once (multiprocessing's forkserver), so a test can kill, limit and measure many runs.

A child can be
- killed with SIGKILL after a delay, or by itself at an exact point: the N-th call of os.replace (every atomic write
  ends with one) or of os.fsync (a file fully written, not yet renamed): `kill_at=("replace", N)`;
- limited to files of at most `fsize` bytes (RLIMIT_FSIZE, with SIGXFSZ ignored so the write raises EFBIG, as a full
  disk raises ENOSPC);
- measured: its peak resident set (VmHWM from /proc/self/status) is reported at exit, and the peak of its anonymous
  memory (RssAnon, sampled every 2 ms: VmHWM also counts the file pages safetensors maps, which the kernel can drop).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch  # noqa: F401  (preloaded into the fork server)
import transformers  # noqa: F401
from transformers.models.qwen3_moe import modeling_qwen3_moe  # noqa: F401

import moekit.cli
import moekit.compress.merge  # noqa: F401
import moekit.compress.prune  # noqa: F401
import moekit.compress.quantize  # noqa: F401
import moekit.runtime  # noqa: F401
import moekit.trace  # noqa: F401

_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload([__name__])


@dataclass
class Result:
    code: int | None  # exit code; None when killed
    killed: bool
    log: str  # stdout and stderr
    seconds: float
    peak_rss: int | None = None  # bytes (VmHWM), when the child exited by itself
    peak_anon: int | None = None  # bytes, the largest RssAnon sampled
    calls: dict | None = None  # os.replace / os.fsync calls made, when it exited by itself

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.log.splitlines() if line.startswith("error:")]


def run(argv: list[str], log: Path, *, env: dict | None = None, fsize: int | None = None,
        kill_after: float | None = None, kill_at: tuple[str, int] | None = None, timeout: float = 300) -> Result:
    """Run `moekit argv` in a forked child; returns when it exits or is killed. Its stdout and stderr come through a
    pipe (a file would be cut by the file-size limit) and are saved to `log`; it reports its peak RSS and counts in
    `log`.json."""
    reader, writer = _CTX.Pipe(duplex=False)
    proc = _CTX.Process(target=_child, args=(argv, dict(env or {}), str(log), fsize, kill_at, writer))
    chunks: list[bytes] = []
    t0 = time.perf_counter()
    proc.start()
    writer.close()
    drain = threading.Thread(target=_drain, args=(reader, chunks), daemon=True)
    drain.start()
    proc.join(kill_after if kill_after is not None else timeout)
    if proc.exitcode is None and kill_after is not None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        raise TimeoutError(f"moekit {' '.join(argv)} ran over {timeout} s")
    seconds = time.perf_counter() - t0
    drain.join(10)
    text = b"".join(chunks).decode(errors="replace")
    Path(log).write_text(text)
    report = Path(f"{log}.json")
    stats = json.loads(report.read_text()) if report.is_file() else {}
    report.unlink(missing_ok=True)
    killed = proc.exitcode == -signal.SIGKILL
    return Result(None if killed else proc.exitcode, killed, text, seconds, stats.get("peak_rss"),
                  stats.get("peak_anon"), stats.get("calls"))


def _drain(reader, chunks: list[bytes]) -> None:
    while chunk := os.read(reader.fileno(), 1 << 16):
        chunks.append(chunk)
    reader.close()


def _child(argv, env, log, fsize, kill_at, writer) -> None:
    os.environ.update(env)
    os.dup2(writer.fileno(), 1)
    os.dup2(writer.fileno(), 2)
    writer.close()
    torch.set_num_threads(1)
    calls = {"replace": 0, "fsync": 0}
    for name in calls:
        _count(name, calls, kill_at)
    if fsize is not None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    anon = [_status("RssAnon")]
    sampler = threading.Thread(target=_sample, args=(anon,), daemon=True)
    sampler.start()
    code = 0
    try:
        moekit.cli.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # a traceback is what the tests look for in the log
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if fsize is not None:
        import resource

        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # the soft limit only: the report below must fit
    Path(f"{log}.json").write_text(json.dumps({"peak_rss": _status("VmHWM"), "peak_anon": max(anon), "calls": calls}))
    os._exit(code)


def _count(name: str, calls: dict, kill_at) -> None:
    real = getattr(os, name)

    def counted(*args, **kwargs):
        calls[name] += 1
        if kill_at == (name, calls[name]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(os, name, counted)


def _sample(anon: list[int]) -> None:
    while True:
        anon[0] = max(anon[0], _status("RssAnon"))
        time.sleep(0.002)


def _status(key: str) -> int:
    """A /proc/self/status memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")
