"""Every kind of bad input, through every command that takes it, through the console entry point (moekit.cli.main):
exit code 2, exactly one stderr line and it starts with "error:", no traceback, nothing written at --out (or --store),
and neither a weight read nor a progress bar drawn before the error (both are made to fail the test if they happen).

The inputs are the factories of tests/bad_inputs.py; docs/reliability.md lists them with what the user sees."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import rich.console
import rich.progress
import transformers

import moekit.trace
from moekit.runtime.checkpoint import build_store_from_checkpoint
from moekit.trace import TraceOptions
from tests.bad_inputs import CHECKPOINTS, HARDWARE, SGLANG, STORES, TOKENIZERS, TRACES, copy
from tests.helpers import run_cli
from tests.trace.helpers import save_checkpoint, write_corpus


ORIGINAL_STATUS = rich.console.Console.status


class WorkStarted(BaseException):
    """Raised when weights are read or a progress bar is drawn: a BaseException, so no handler in moekit hides it."""


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    ckpt = save_checkpoint(root / "ckpt")
    txt, jsonl = write_corpus(root / "data")
    trace = root / "trace"
    moekit.trace.record(str(ckpt), [str(txt)], trace, options=TraceOptions(seq_len=32, chunk_tokens=64,
                                                                           activation_stats=True))
    store = build_store_from_checkpoint(ckpt, root / "store")
    return {"root": root, "ckpt": ckpt, "txt": txt, "jsonl": jsonl, "trace": trace, "store": store}


@pytest.fixture
def guarded(monkeypatch, tmp_path):
    """No weight read, no progress bar, no default store under $HOME."""

    def started(*args, **kwargs):
        raise WorkStarted("work started before the error")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", started)
    monkeypatch.setattr(rich.progress.Progress, "start", started)
    monkeypatch.setattr(rich.console.Console, "status", started)
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))


def commands(g: dict, model: Path, out: Path, store: Path) -> dict[str, list[str]]:
    """Each command that opens a checkpoint, with arguments that succeed on a good checkpoint."""
    m, txt, trace = str(model), str(g["txt"]), str(g["trace"])
    return {
        "info": ["info", m],
        "trace": ["trace", m, "--data", txt, "--out", str(out), "--seq-len", "16", "--max-tokens", "64"],
        "eval": ["eval", m, "--data", txt, "--max-tokens", "64", "--seq-len", "16"],
        "ablate": ["ablate", m, "--trace", trace, "--data", txt, "--experts", "top", "--count", "1", "--max-tokens",
                   "32"],
        "prune": ["prune", m, "--keep", "8", "--method", "frequency", "--calib", txt, "--out", str(out),
                  "--max-tokens", "64", "--seq-len", "16"],
        "merge": ["merge", m, "--groups", "8", "--calib", txt, "--out", str(out), "--calib-tokens", "64",
                  "--seq-len", "16"],
        "quantize": ["quantize", m, "--avg-bits", "4", "--out", str(out)],
        "run": ["run", m, "--prompt", "hi", "--budget", "1MB", "--store", str(store), "--max-new-tokens", "2",
                "--json"],
    }


CHECKPOINT_COMMANDS = ("info", "trace", "eval", "ablate", "prune", "merge", "quantize", "run")
NEEDS_TOKENIZER = ("trace", "eval", "ablate", "prune", "merge", "run")


def assert_one_line_error(argv: list[str], capsys, expect: str) -> str:
    capsys.readouterr()  # what the test's own setup printed
    code, out, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}, stderr: {err}"
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    assert expect in lines[0], f"{expect!r} not in {lines[0]!r}"
    return lines[0]


def test_every_command_succeeds_on_the_good_inputs(good, tmp_path, capsys, monkeypatch):
    """The arguments below are right: what fails in the other tests fails because of the one damage it makes."""
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    for name in CHECKPOINT_COMMANDS:
        argv = commands(good, good["ckpt"], tmp_path / f"out-{name}", tmp_path / "store")[name]
        code, _, err = run_cli(argv, capsys)
        assert code == 0, f"{name}: {err}"
    for argv in (["trace-info", str(good["trace"])], ["simulate", str(good["trace"]), "--model", str(good["ckpt"])],
                 ["analyze", str(good["trace"]), "--out", str(tmp_path / "r.html")]):
        assert run_cli(argv, capsys)[0] == 0, argv


# ------------------------------------------------------------------------------------------- damaged checkpoints

# `info` describes a config-only folder (shapes come from the config), so "no weights" is not an error there
CHECKPOINT_CASES = [(damage, cmd) for damage in CHECKPOINTS for cmd in CHECKPOINT_COMMANDS
                    if (damage, cmd) != ("no weights", "info")]
TOKENIZER_CASES = [(damage, cmd) for damage in TOKENIZERS for cmd in NEEDS_TOKENIZER]


@pytest.mark.parametrize("damage, cmd", CHECKPOINT_CASES + TOKENIZER_CASES, ids=lambda x: x)
def test_damaged_checkpoint(good, guarded, tmp_path, capsys, damage, cmd):
    make, expect = {**CHECKPOINTS, **TOKENIZERS}[damage]
    model = copy(good["ckpt"], tmp_path / "model")
    make(model)
    out, store = tmp_path / "out", tmp_path / "store"
    assert_one_line_error(commands(good, model, out, store)[cmd], capsys, expect)
    assert not out.exists() and not store.exists() and not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------------- damaged traces

READERS = {  # command -> the parts of a trace it reads
    "trace-info": {"meta", "ids", "domain", "stats"},
    "analyze": {"meta", "ids", "domain", "stats"},
    "simulate": {"meta", "ids"},
    "ablate": {"meta", "stats"},
    "run --eam-trace": {"meta", "ids"},
}
TRACE_CASES = [(damage, cmd) for damage, (_, _, part) in TRACES.items() for cmd, parts in READERS.items()
               if part in parts]


def _trace_argv(g: dict, cmd: str, trace: Path, tmp: Path) -> list[str]:
    return {
        "trace-info": ["trace-info", str(trace)],
        "analyze": ["analyze", str(trace), "--out", str(tmp / "report.html")],
        "simulate": ["simulate", str(trace), "--model", str(g["ckpt"])],
        "ablate": ["ablate", str(g["ckpt"]), "--trace", str(trace), "--data", str(g["txt"]), "--experts", "top",
                   "--count", "1"],
        "run --eam-trace": ["run", str(g["ckpt"]), "--prompt", "hi", "--eam-trace", str(trace), "--store",
                            str(tmp / "store")],
    }[cmd]


@pytest.mark.parametrize("damage, cmd", TRACE_CASES, ids=lambda x: x)
def test_damaged_trace(good, guarded, tmp_path, capsys, monkeypatch, damage, cmd):
    make, expect, part = TRACES[damage]
    if cmd == "analyze" and part != "meta":  # data damage shows while the analysis reads the data, under its spinner
        monkeypatch.setattr(rich.console.Console, "status", ORIGINAL_STATUS)
    trace = copy(good["trace"], tmp_path / "trace")
    make(trace)
    assert_one_line_error(_trace_argv(good, cmd, trace, tmp_path), capsys, expect)
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "store").exists()


@pytest.mark.parametrize("damage", [d for d in TRACES if d.startswith(("manifest", "no manifest"))])
def test_resume_into_a_damaged_trace(good, guarded, tmp_path, capsys, damage):
    """--resume reads the manifest before the weights; chunk damage is what --resume repairs (tests/trace)."""
    make, expect, _ = TRACES[damage]
    trace = copy(good["trace"], tmp_path / "trace")
    make(trace)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in trace.iterdir())
    argv = ["trace", str(good["ckpt"]), "--data", str(good["txt"]), "--out", str(trace), "--resume"]
    assert_one_line_error(argv, capsys, expect if damage != "no manifest" else "manifest.json")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in trace.iterdir()) == before


# ------------------------------------------------------------------------------------------- SGLang dumps


@pytest.mark.parametrize("damage", SGLANG)
def test_bad_sglang_dump(guarded, tmp_path, capsys, damage):
    write, expect = SGLANG[damage]
    dump = tmp_path / "expert_distribution_recorder_1.pt"
    write(dump)
    assert_one_line_error(["trace-import-sglang", str(dump), "--out", str(tmp_path / "t")], capsys, expect)
    assert not (tmp_path / "t").exists() and not any(p.name.startswith(".t.") for p in tmp_path.iterdir())


# ------------------------------------------------------------------------------------------- hardware profiles


@pytest.mark.parametrize("damage", HARDWARE)
def test_bad_hardware_profile(good, guarded, tmp_path, capsys, damage):
    text, expect = HARDWARE[damage]
    profile = tmp_path / "hw.yaml"
    profile.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert_one_line_error(["simulate", str(good["trace"]), "--hardware", str(profile), "--model", str(good["ckpt"])],
                          capsys, expect)


# ------------------------------------------------------------------------------------------- expert stores


@pytest.mark.parametrize("damage", STORES)
def test_damaged_expert_store(good, guarded, tmp_path, capsys, damage):
    make, expect = STORES[damage]
    store = copy(good["store"], tmp_path / "store")
    make(store)
    assert_one_line_error(["run", str(good["ckpt"]), "--prompt", "hi", "--store", str(store)], capsys, expect)


# ------------------------------------------------------------------------------------------- data files

DATA = {  # name -> (file name, bytes, text the error line must hold)
    "binary": ("blob.txt", bytes(range(256)) * 8, "not UTF-8"),
    "NUL bytes": ("nul.txt", b"text\x00more text", "NUL"),
    "latin-1": ("latin.txt", "caf\xe9 cr\xe8me".encode("latin-1"), "not UTF-8"),
    "empty": ("empty.txt", b"", "holds no text"),
    "only separators": ("seps.txt", b"\n<|endoftext|>\n\n<|endoftext|>\n", "holds no text"),
    "JSONL not JSON": ("bad.jsonl", b'{"text": "a"}\n{oops}\n', "bad.jsonl:2"),
    "JSONL without text": ("notext.jsonl", b'{"body": "a"}\n', "`text`"),
    "JSONL text not a string": ("num.jsonl", b'{"text": 5}\n', "`text`"),
    "JSONL a list per line": ("list.jsonl", b'[1, 2]\n', "`text`"),
    "JSONL empty texts": ("blank.jsonl", b'{"text": ""}\n{"text": "  "}\n', "holds no text"),
    "no such file or domain": (None, None, "no such file"),
    "a folder": ("", None, "no such file"),
}
DATA_COMMANDS = ("trace", "eval", "ablate", "prune", "merge")


@pytest.mark.parametrize("damage, cmd", [(d, c) for d in DATA for c in DATA_COMMANDS], ids=lambda x: x)
def test_bad_data_file(good, guarded, tmp_path, capsys, damage, cmd):
    name, data, expect = DATA[damage]
    path = tmp_path / (name if name is not None else "nowhere.txt")
    if data is not None:
        path.write_bytes(data)
    argv = commands(good, good["ckpt"], tmp_path / "out", tmp_path / "store")[cmd]
    argv[argv.index(str(good["txt"]))] = str(path)
    assert_one_line_error(argv, capsys, expect)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- arguments

# (command, option -> value replaced or added, text the error line must hold)
ARGUMENTS = [
    ("trace", {"--seq-len": "0"}, "--seq-len"), ("trace", {"--batch-size": "0"}, "--batch-size"),
    ("trace", {"--chunk-tokens": "-1"}, "--chunk-tokens"), ("trace", {"--max-tokens": "0"}, "--max-tokens"),
    ("trace", {"--dtype": "float33"}, "--dtype"), ("trace", {"--seq-len": "many"}, "--seq-len"),
    ("eval", {"--seq-len": "0"}, "--seq-len"), ("eval", {"--batch-size": "0"}, "--batch-size"),
    ("eval", {"--max-tokens": "-5"}, "--max-tokens"), ("eval", {"--threads": "-2"}, "--threads"),
    ("ablate", {"--experts": "bogus"}, "--experts"), ("ablate", {"--count": "0"}, "--count"),
    ("ablate", {"--max-tokens": "0"}, "--max-tokens"),
    ("prune", {"--keep": "0"}, "--keep"), ("prune", {"--keep": "99"}, "only 16 experts"),
    ("prune", {"--keep": "2"}, "top-4"), ("prune", {"--keep": "1.5"}, "--keep"),
    ("prune", {"--keep": "half"}, "--keep"),
    ("prune", {"--keep": "0.01"}, "--keep"), ("prune", {"--method": "bogus"}, "bogus"),
    ("prune", {"--max-tokens": "0"}, "--max-tokens"), ("prune", {"--seq-len": "0"}, "--seq-len"),
    ("prune", {"--threads": "-1"}, "--threads"),
    ("merge", {"--groups": "0"}, "--groups"), ("merge", {"--groups": "99"}, "--groups"),
    ("merge", {"--groups": "3"}, "--groups"), ("merge", {"--method": "bogus"}, "bogus"),
    ("merge", {"--router": "bogus"}, "--router"), ("merge", {"--low-rank": "0"}, "--low-rank"),
    ("merge", {"--calib-tokens": "0"}, "--calib-tokens"), ("merge", {"--seq-len": "0"}, "--seq-len"),
    ("merge", {"--dtype": "int8"}, "--dtype"),
    ("quantize", {"--avg-bits": "2.5"}, "--method rtn"), ("quantize", {"--avg-bits": "1", "--method": "pmq",
                                                                       "--calib": "TXT"}, "below"),
    ("quantize", {"--avg-bits": "nan"}, "--avg-bits"), ("quantize", {"--avg-bits": "-3"}, "--avg-bits"),
    ("quantize", {"--method": "gptq"}, "gptq"), ("quantize", {"--group-size": "7"}, "--group-size"),
    ("quantize", {"--group-size": "0"}, "--group-size"),
    ("quantize", {"--avg-bits": "3", "--method": "pmq"}, "--calib"),
    ("quantize", {"--dtype": "float8"}, "--dtype"),
    ("run", {"--prompt": ""}, "--prompt is empty"), ("run", {"--budget": "lots"}, "size"),
    ("run", {"--budget": "0"}, "minimum budget"), ("run", {"--budget": "50KB"}, "minimum budget"),
    ("run", {"--budget": "-5MB"}, "size"), ("run", {"--policy": "bogus"}, "bogus"),
    ("run", {"--policy": "belady"}, "belady"), ("run", {"--lowbit": "5"}, "--lowbit"),
    ("run", {"--lowbit-threshold": "-1"}, "--lowbit-threshold"), ("run", {"--io-threads": "0"}, "--io-threads"),
    ("run", {"--threads": "0"}, "--threads"), ("run", {"--max-new-tokens": "0"}, "--max-new-tokens"),
    ("run", {"--eam-trace": "NOWHERE"}, "no trace at"),
    ("run", {"--unknown-flag": None}, "--unknown-flag"),
]


def _argv(base: list[str], changes: dict, g: dict, tmp: Path) -> list[str]:
    argv = list(base)
    for option, value in changes.items():
        value = {"TXT": str(g["txt"]), "NOWHERE": str(tmp / "nowhere")}.get(value, value)
        if option in argv:
            argv[argv.index(option) + 1] = value
        else:
            argv += [option] if value is None else [option, value]
    return argv


@pytest.mark.parametrize("cmd, changes, expect", ARGUMENTS, ids=lambda x: str(x))
def test_bad_argument(good, guarded, tmp_path, capsys, cmd, changes, expect):
    out, store = tmp_path / "out", tmp_path / "store"
    argv = _argv(commands(good, good["ckpt"], out, store)[cmd], changes, good, tmp_path)
    assert_one_line_error(argv, capsys, expect)
    assert not out.exists() and not store.exists()


@pytest.mark.parametrize("cmd", ["trace", "prune", "merge", "quantize"])
def test_out_already_there_is_left_alone(good, guarded, tmp_path, capsys, cmd):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert_one_line_error(commands(good, good["ckpt"], out, tmp_path / "store")[cmd], capsys, str(out))
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("cmd", ["trace", "prune", "merge", "quantize"])
def test_out_under_a_file(good, guarded, tmp_path, capsys, cmd):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"
    assert_one_line_error(commands(good, good["ckpt"], out, tmp_path / "store")[cmd], capsys, "file")


SIMULATE = [({"--capacity": "0x"}, "capacity"), ({"--capacity": "nanx"}, "capacity"), ({"--capacity": "lots"},
                                                                                          "capacity"),
            ({"--policy": "bogus"}, "bogus"), ({"--policy": ","}, "--policy"), ({"--max-tokens": "-1"}, "--max-tokens"),
            ({"--hardware": "quantum"}, "unknown hardware profile"), ({"--model": "NOWHERE"}, "no model at")]


@pytest.mark.parametrize("changes, expect", SIMULATE, ids=lambda x: str(x))
def test_bad_simulate_argument(good, guarded, tmp_path, capsys, changes, expect):
    argv = _argv(["simulate", str(good["trace"]), "--model", str(good["ckpt"])], changes, good, tmp_path)
    assert_one_line_error(argv, capsys, expect)


def test_analyze_with_a_tokenizer_that_is_not_there(good, guarded, tmp_path, capsys):
    assert_one_line_error(["analyze", str(good["trace"]), "--tokenizer", str(tmp_path / "none"), "--out",
                           str(tmp_path / "r.html")], capsys, "no tokenizer")
    assert not (tmp_path / "r.html").exists()


def test_analyze_out_in_a_missing_folder_fails_before_the_analysis(good, guarded, tmp_path, capsys):
    assert_one_line_error(["analyze", str(good["trace"]), "--out", str(tmp_path / "no" / "r.html")], capsys,
                          "does not exist")
    assert_one_line_error(["analyze", str(good["trace"]), "--out", str(tmp_path)], capsys, "is a folder")


def test_an_empty_trace_and_an_aggregate_one(good, guarded, tmp_path, capsys):
    import torch

    empty = tmp_path / "empty"
    shutil.copytree(good["trace"], empty)
    from tests.bad_inputs import edit_json

    for chunk in empty.glob("chunk-*.parquet"):
        chunk.unlink()
    edit_json(empty / "manifest.json", chunks=[], tokens=0, sequences=0)
    assert_one_line_error(["simulate", str(empty), "--model", str(good["ckpt"])], capsys, "no traced tokens")
    assert_one_line_error(["analyze", str(empty)], capsys, "with 0 tokens")
    torch.save({"rank": 0, "logical_count": torch.ones(2, 3, 4, dtype=torch.int64)}, tmp_path / "stat.pt")
    assert run_cli(["trace-import-sglang", str(tmp_path / "stat.pt"), "--out", str(tmp_path / "agg")], capsys)[0] == 0
    assert_one_line_error(["simulate", str(tmp_path / "agg"), "--model", str(good["ckpt"])], capsys, "aggregate")
    assert_one_line_error(["analyze", str(tmp_path / "agg")], capsys, "counts")
