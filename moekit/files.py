"""Writing user-visible files safely, for every stage: nothing half-written is ever left under a final name.

- `atomic_file(path)`: write to a temporary name beside `path`, fsync, rename over `path`, fsync the folder; the
  temporary file is removed when the write fails (a full disk, an exception), and a kill -9 leaves only a hidden
  `.NAME.tmp-PID` that no reader looks at and the next writer of `path` removes.
- `atomic_folder(out)`: the same for a whole folder (an output checkpoint): the folder appears under `out` complete,
  or not at all.
- `disk_errors(path)`: a full disk (ENOSPC, EDQUOT), a file-size limit (EFBIG) or an unwritable place becomes one
  UserError naming the file and the fix, whichever library did the write (Python, Arrow, the safetensors Rust writer).
- `check_out(path)`: the cheap checks on an --out path, run before any weight is loaded.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from moekit.errors import UserError

FULL_DISK = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file-size limit was reached",
         errno.EDQUOT: "the disk quota is exceeded"}
# the safetensors Rust writer reports I/O errors as text: "I/O error: No space left on device (os error 28)"
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def tmp_name(path: Path) -> Path:
    """The hidden temporary name this process writes `path` under."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def disk_errors(path) -> Iterator[None]:
    """Turn a failed write of `path` into one UserError that names it and the fix."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        failure = write_failure(path, err)
        if failure is None:
            raise
        raise failure from None


def write_failure(path, err: BaseException, *, full_only: bool = False) -> UserError | None:
    """The UserError for an exception a write of `path` raised (an OSError, or safetensors' SafetensorError, which is
    no OSError and carries the errno only in its text), or None if it is no write failure (or, with full_only, no full
    disk or file-size limit)."""
    if isinstance(err, OSError):
        code, detail = err.errno, err.strerror or str(err)
    elif type(err).__name__ == "SafetensorError" and _RUST_OS_ERROR.search(str(err)):
        code, detail = int(_RUST_OS_ERROR.search(str(err)).group(1)), str(err).splitlines()[0]
    else:
        return None
    if full_only and code not in FULL_DISK:
        return None
    return write_error(path, code, detail)


def write_error(path, code: int | None, detail: str) -> UserError:
    if code in FULL_DISK:
        return UserError(f"cannot write {path}: {FULL_DISK[code]} ({detail}); nothing was left half-written: free "
                         f"space (or raise the limit) and run the same command again")
    return UserError(f"cannot write {path} ({detail}): choose a folder you can write to")


@contextlib.contextmanager
def atomic_file(path) -> Iterator[Path]:
    """Yields the temporary path to write; on success it is renamed to `path` (durably), on failure removed."""
    path = Path(path)
    tmp = tmp_name(path)
    with disk_errors(path):
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_bytes(path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_json(path, obj, indent: int | None = 1) -> None:
    write_bytes(path, (json.dumps(obj, indent=indent, default=str) + "\n").encode())


def remove_stale(path: Path, pattern: str | None = None) -> None:
    """Remove what killed writers left: `.NAME.tmp-PID` files or folders, of `path` (or, with pattern="*", of anything
    in the folder `path`), whose process is gone."""
    folder, name = (path, pattern) if pattern else (path.parent, glob.escape(path.name))
    for stale in folder.glob(f".{name}.tmp-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(out, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary folder beside `out` to fill; on success it is renamed to `out`, on failure removed."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists: choose another --out or remove it")
    tmp = tmp_name(out)
    with disk_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            yield tmp
            for f in sorted(tmp.rglob("*")):  # durable before it is visible: a crash cannot expose short files
                if f.is_file():
                    with open(f, "rb+") as handle:
                        os.fsync(handle.fileno())
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(out.parent)


def check_out(out, *, option: str = "--out", exist_ok: bool = False) -> Path:
    """The cheap checks on an output path before any work: not there yet (unless exist_ok), and its nearest existing
    parent is a folder this process may write into."""
    out = Path(out)
    if out.exists() and not exist_ok:
        raise UserError(f"{option} {out} already exists: choose another {option} or remove it")
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise UserError(f"{option} {out}: {parent} is a file, not a folder; choose another {option}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{option} {out}: cannot write into {parent} (permission denied); choose another {option}")
    return out


def check_out_file(out, *, option: str = "--out") -> Path:
    """check_out for an output file that may be replaced (a report, a steering file): not a folder, and in a folder
    that exists."""
    target = check_out(out, option=option, exist_ok=True)
    if target.is_dir():
        raise UserError(f"{option} {target} is a folder: give a file name, e.g. {target / 'out.json'}")
    if not target.parent.is_dir():
        raise UserError(f"{option} {target}: the folder {target.parent} does not exist; create it or choose another "
                        f"{option}")
    return target


def fsync_dir(folder: Path) -> None:
    """Make a rename durable: POSIX flushes a directory entry only when the directory itself is fsynced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
