"""The bad-input table (tests/cli/test_bad_input.py) through the commands and kinds of input it does not drive:
steering files (--steer) and routing specs (--routing) through eval / trace / run / serve, `serve`'s checkpoints and
arguments, placement plans and SGLang maps through place-eval, traces, dumps and arguments through place and
place-eval, traces and arguments through `experts find`, and damaged multimodal-wrapper and encoder-decoder
checkpoints through every command that takes them. Same assertions: exit 2, one `error:` line naming the problem,
no traceback, nothing at --out, no weight read, no progress bar and no port bound before the error.

The inputs are the factories of tests/bad_inputs.py; docs/reliability.md lists them with what the user sees."""

from __future__ import annotations

from pathlib import Path

import pytest
import rich.console
import safetensors.torch
import transformers

import moekit.cli
import moekit.serve.server
import moekit.trace
from moekit.trace import TraceOptions
from tests.bad_inputs import (CHECKPOINTS, HARDWARE, KIND_CHECKPOINTS, PLANS, REFERENCES, ROUTING_SPECS, SGLANG,
                              SGLANG_MAPS, STEERING, TOKENIZERS, TRACES, copy)
from tests.cli.test_bad_input import (ORIGINAL_STATUS, WorkStarted, assert_one_line_error, commands,  # noqa: F401
                                      good, guarded)
from tests.helpers import run_cli
from tests.trace.helpers import save_checkpoint

ROUTED = ("eval", "trace", "run", "serve")  # the commands that take --routing and --steer


def _serve(model: Path, store: Path) -> list[str]:
    return ["serve", str(model), "--port", "0", "--budget", "1MB", "--store", str(store)]


def argv_of(g: dict, cmd: str, model: Path, out: Path, store: Path) -> list[str]:
    return _serve(model, store) if cmd == "serve" else commands(g, model, out, store)[cmd]


def _with(argv: list[str], changes: dict, tmp: Path) -> list[str]:
    """argv with each option's value replaced (or the option added); NOWHERE: a path with nothing there, FILE: a
    file, UNDER_FILE: a path under that file, FOLDER: a folder."""
    (tmp / "file").write_text("x")
    paths = {"NOWHERE": tmp / "nowhere", "NOWHERE/s.json": tmp / "nowhere" / "s.json", "FILE": tmp / "file",
             "UNDER_FILE": tmp / "file" / "out", "FOLDER": tmp}
    argv = list(argv)
    for option, value in changes.items():
        value = str(paths[value]) if value in paths else value
        if option in argv:
            argv[argv.index(option) + 1] = value
        else:
            argv += [option, value]
    return argv


@pytest.fixture
def sealed(guarded, monkeypatch):
    """`guarded`, and no port bound, nor weights read through a wrapper's or encoder-decoder's own class or
    safetensors' load_file (the validator reads headers only)."""

    def started(*args, **kwargs):
        raise WorkStarted("work started before the error")

    monkeypatch.setattr(moekit.serve.server, "bind", started)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(started))
    monkeypatch.setattr(safetensors.torch, "load_file", started)


def test_serve_reaches_its_port_on_the_good_inputs(good, sealed, tmp_path):
    """What serve refuses below, it refuses before the port; on good inputs it gets as far as binding it."""
    steer = tmp_path / "steer.json"
    steer.write_text('{"schema": "moekit.steering", "version": 1, "experts": [{"layer": 0, "expert": 1, '
                     '"action": "mask"}]}')
    for extra in ([], ["--routing", "topk=2"], ["--steer", str(steer)]):
        with pytest.raises(WorkStarted):
            moekit.cli.main(_serve(good["ckpt"], tmp_path / "store") + extra)


def test_routed_commands_succeed_on_a_good_policy_and_steering_file(good, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    steer = tmp_path / "steer.json"
    steer.write_text('{"schema": "moekit.steering", "version": 1, "experts": [{"layer": 0, "expert": 1, '
                     '"action": "mask"}]}')
    for cmd in ("eval", "trace", "run"):
        for extra in (["--routing", "topk=2"], ["--steer", str(steer)]):
            out = tmp_path / f"out-{cmd}-{extra[0]}"
            code, _, err = run_cli(argv_of(good, cmd, good["ckpt"], out, tmp_path / "store") + extra, capsys)
            assert code == 0, f"{cmd} {extra}: {err}"


# ------------------------------------------------------------------------------------------- steering and routing


@pytest.mark.parametrize("damage, cmd", [(d, c) for d in STEERING for c in ROUTED], ids=lambda x: x)
def test_bad_steering_file(good, sealed, tmp_path, capsys, damage, cmd):
    data, expect = STEERING[damage]
    steer = tmp_path / "steer.json"
    if data is not None:
        steer.write_bytes(data)
    out, store = tmp_path / "out", tmp_path / "store"
    line = assert_one_line_error(argv_of(good, cmd, good["ckpt"], out, store) + ["--steer", str(steer)], capsys,
                                 expect)
    assert f"--steer {steer}" in line, line  # the file, also where the refusal is the model's (a layer it lacks)
    assert not out.exists() and not store.exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("spec, cmd", [(s, c) for s in ROUTING_SPECS for c in ROUTED], ids=lambda x: x)
def test_bad_routing_spec(good, sealed, tmp_path, capsys, spec, cmd):
    out, store = tmp_path / "out", tmp_path / "store"
    spec_arg = spec.replace("NOWHERE", str(tmp_path / "nowhere"))
    assert_one_line_error(argv_of(good, cmd, good["ckpt"], out, store) + ["--routing", spec_arg], capsys,
                          ROUTING_SPECS[spec])
    assert not out.exists() and not store.exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("damage, cmd", [(d, c) for d, (_, _, part) in TRACES.items() if part == "meta"
                                         for c in ROUTED], ids=lambda x: x)
def test_replay_of_a_damaged_trace(good, sealed, tmp_path, capsys, damage, cmd):
    """--routing replay=TRACE opens the trace (manifest, chunk footers) before any weight."""
    make, expect, _ = TRACES[damage]
    trace = copy(good["trace"], tmp_path / "trace")
    make(trace)
    out, store = tmp_path / "out", tmp_path / "store"
    assert_one_line_error(argv_of(good, cmd, good["ckpt"], out, store) + ["--routing", f"replay={trace}"], capsys,
                          expect if damage not in ("no trace folder", "no manifest") else "no trace there")
    assert not out.exists() and not store.exists()


@pytest.mark.parametrize("damage, cmd", [(d, c) for d in REFERENCES for c in ("run", "serve")], ids=lambda x: x)
def test_bad_c3po_reference(good, sealed, tmp_path, capsys, damage, cmd):
    """--routing c3po=FILE (run and serve: the batch commands refuse c3po) reads the reference before any weight."""
    write, expect = REFERENCES[damage]
    ref = tmp_path / "ref.npz"
    write(ref)
    store = tmp_path / "store"
    argv = argv_of(good, cmd, good["ckpt"], tmp_path / "out", store) + ["--routing", f"c3po={ref}"]
    line = assert_one_line_error(argv, capsys, expect)
    assert str(ref) in line and not store.exists(), line


# ------------------------------------------------------------------------------------------- serve


@pytest.mark.parametrize("damage", list(CHECKPOINTS) + list(TOKENIZERS))
def test_serve_damaged_checkpoint(good, sealed, tmp_path, capsys, damage):
    make, expect = {**CHECKPOINTS, **TOKENIZERS}[damage]
    model = copy(good["ckpt"], tmp_path / "model")
    make(model)
    assert_one_line_error(_serve(model, tmp_path / "store"), capsys, expect)
    assert not (tmp_path / "store").exists() and not (tmp_path / "cache").exists()


SERVE = [({"--budget": "0"}, "minimum budget"), ({"--budget": "-5MB"}, "size"), ({"--io-threads": "0"}, "--io-threads"),
         ({"--threads": "0"}, "--threads"), ({"--lowbit": "5"}, "--lowbit"),
         ({"--eam-trace": "NOWHERE"}, "no trace at"),
         ({"--store": "FILE"}, "is a file"), ({"--max-queue": "0"}, "--max-queue"),
         ({"--max-kv-tokens": "0"}, "--max-kv-tokens"), ({"--max-step-tokens": "0"}, "--max-step-tokens"),
         ({"--max-model-len": "0"}, "--max-model-len"), ({"--port": "-1"}, "--port"),
         ({"--host": "not a host name"}, "--host"), ({"--device": "tpu"}, "--device"),
         ({"--served-name": " "}, "--served-name"), ({"--max-queue": "-1"}, "--max-queue"),
         ({"--max-body-bytes": "-1"}, "--max-body-bytes")]


@pytest.mark.parametrize("changes, expect", SERVE, ids=lambda x: str(x))
def test_bad_serve_argument(good, sealed, tmp_path, capsys, changes, expect):
    assert_one_line_error(_with(_serve(good["ckpt"], tmp_path / "store"), changes, tmp_path), capsys, expect)
    assert not (tmp_path / "store").exists()


@pytest.fixture(scope="module")
def other_trace(good, tmp_path_factory):
    """A trace of another model (a tiny Mixtral, 8 experts)."""
    root = tmp_path_factory.mktemp("other")
    moekit.trace.record(str(save_checkpoint(root / "mixtral", "mixtral")), [str(good["txt"])], root / "trace",
                        options=TraceOptions(seq_len=16, chunk_tokens=64))
    return root / "trace"


def test_serve_an_eam_trace_of_another_model(good, other_trace, sealed, tmp_path, capsys):
    assert_one_line_error(_serve(good["ckpt"], tmp_path / "store") + ["--eam-trace", str(other_trace)], capsys,
                          "--eam-trace")
    assert not (tmp_path / "store").exists()


# ------------------------------------------------------------------------------------------- placement


@pytest.fixture(scope="module")
def plan(good, tmp_path_factory):
    """A `moekit place --gpus 2` plan of the good trace (3 MoE layers, 16 experts)."""
    out = tmp_path_factory.mktemp("plan") / "plan"
    with pytest.raises(SystemExit) as done:
        moekit.cli.main(["place", str(good["trace"]), "--gpus", "2", "--out", str(out)])
    assert not done.value.code
    return out


def test_place_and_place_eval_succeed_on_the_good_inputs(good, plan, tmp_path, capsys):
    assert run_cli(["place-eval", str(plan), "--trace", str(good["trace"])], capsys)[0] == 0
    assert run_cli(["place-eval", str(plan / "sglang.json"), "--gpus", "2", "--trace", str(good["trace"])],
                   capsys)[0] == 0
    code, _, err = run_cli(["place", str(good["trace"]), "--gpus", "2", "--out", str(tmp_path / "p")], capsys)
    assert code == 0, err


@pytest.mark.parametrize("damage", [d for d in HARDWARE if HARDWARE[d][1] in ("not a mapping",
                                                                             "cannot read hardware profile")])
def test_place_eval_with_a_bad_hardware_profile(good, plan, sealed, tmp_path, capsys, damage):
    text, expect = HARDWARE[damage]
    profile = tmp_path / "hw.yaml"
    profile.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert_one_line_error(["place-eval", str(plan), "--trace", str(good["trace"]), "--hardware", str(profile)],
                          capsys, expect)


PLAN_READERS = {  # command -> argv with the plan P (analyze --placement scores it in the report)
    "place-eval": lambda g, p, tmp: ["place-eval", str(p), "--trace", str(g["trace"])],
    "analyze --placement": lambda g, p, tmp: ["analyze", str(g["trace"]), "--placement", str(p), "--out",
                                              str(tmp / "r.html")],
}


def test_analyze_with_a_placement_succeeds_on_the_good_inputs(good, plan, tmp_path, capsys):
    code, _, err = run_cli(PLAN_READERS["analyze --placement"](good, plan, tmp_path), capsys)
    assert code == 0 and (tmp_path / "r.html").is_file(), err


@pytest.mark.parametrize("damage, cmd", [(d, c) for d in PLANS for c in PLAN_READERS], ids=lambda x: x)
def test_damaged_plan(good, plan, sealed, tmp_path, capsys, damage, cmd):
    make, expect = PLANS[damage]
    folder = copy(plan, tmp_path / "plan")
    make(folder)
    line = assert_one_line_error(PLAN_READERS[cmd](good, folder, tmp_path), capsys, expect)
    assert str(folder) in line, line
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("damage", SGLANG_MAPS)
def test_bad_sglang_map(good, sealed, tmp_path, capsys, damage):
    data, expect = SGLANG_MAPS[damage]
    path = tmp_path / "map.json"
    path.write_bytes(data)
    line = assert_one_line_error(["place-eval", str(path), "--gpus", "2", "--trace", str(good["trace"])], capsys,
                                 expect)
    assert str(path) in line, line


PLACE_READS = {"meta", "ids"}  # what place and place-eval read of a trace


@pytest.mark.parametrize("damage, cmd", [(d, c) for d, (_, _, part) in TRACES.items() if part in PLACE_READS
                                         for c in ("place", "place-eval")], ids=lambda x: x)
def test_place_on_a_damaged_trace(good, plan, sealed, tmp_path, capsys, monkeypatch, damage, cmd):
    make, expect, part = TRACES[damage]
    if part != "meta":  # routing damage shows while the plan or the score reads it, under the spinner
        monkeypatch.setattr(rich.console.Console, "status", ORIGINAL_STATUS)
    trace = copy(good["trace"], tmp_path / "trace")
    make(trace)
    argv = (["place", str(trace), "--gpus", "2", "--out", str(tmp_path / "out")] if cmd == "place" else
            ["place-eval", str(plan), "--trace", str(trace)])
    assert_one_line_error(argv, capsys, expect)
    assert not (tmp_path / "out").exists()


STAT_DUMP = ("not a torch file", "empty file", "stat counts all zero", "stat counts of 4 dimensions",
             "stat counts negative")  # place reads `stat` dumps (the table's message); a per_token one is refused


@pytest.mark.parametrize("damage", SGLANG)
def test_place_on_a_bad_sglang_dump(sealed, tmp_path, capsys, damage):
    write, expect = SGLANG[damage]
    dump = tmp_path / "expert_distribution_recorder_1.pt"
    write(dump)
    expect = expect if damage in STAT_DUMP else "no trace at" if damage == "not a file" else "not an SGLang `stat` dump"
    assert_one_line_error(["place", str(dump), "--gpus", "2", "--out", str(tmp_path / "out")], capsys, expect)
    assert not (tmp_path / "out").exists()


PLACE = [({"--gpus": "0"}, "--gpus"), ({"--gpus": "3"}, "--redundant"), ({"--nodes": "0"}, "--nodes"),
         ({"--nodes": "3"}, "--nodes"), ({"--redundant": "-1"}, "--redundant"), ({"--method": "bogus"}, "bogus"),
         ({"--time-limit": "0"}, "--time-limit"), ({"--balance-slack": "-1"}, "--balance-slack"),
         ({"--model": "NOWHERE"}, "no model at"), ({"--checkpoint": "NOWHERE"}, "no model at"),
         ({"--out": "UNDER_FILE"}, "file")]
PLACE_EVAL = [({"--hardware": "quantum"}, "hardware"), ({"--batch-tokens": "0"}, "--batch-tokens"),
              ({"--model": "NOWHERE"}, "no model at"), ({"--gpus": "3"}, "--gpus"), ({"--nodes": "0"}, "--nodes"),
              ({"--trace": "NOWHERE"}, "no trace at")]


@pytest.mark.parametrize("changes, expect", PLACE, ids=lambda x: str(x))
def test_bad_place_argument(good, sealed, tmp_path, capsys, changes, expect):
    out = tmp_path / "out"
    argv = _with(["place", str(good["trace"]), "--gpus", "2", "--out", str(out)], changes, tmp_path)
    assert_one_line_error(argv, capsys, expect)
    assert not out.exists()


@pytest.mark.parametrize("changes, expect", PLACE_EVAL, ids=lambda x: str(x))
def test_bad_place_eval_argument(good, plan, sealed, tmp_path, capsys, changes, expect):
    argv = _with(["place-eval", str(plan), "--trace", str(good["trace"])], changes, tmp_path)
    assert_one_line_error(argv, capsys, expect)


CONFIG_DAMAGE = ("missing folder", "a file, not a folder", "no config.json", "config.json not JSON",
                 "config.json binary", "config.json a list", "config.json no model_type", "unknown model_type",
                 "dense model", "config value of the wrong type", "config with a billion layers")  # what --model reads
MODEL_READERS = {  # command -> argv with the checkpoint M: --checkpoint reads the weights, --model the config only
    "place --checkpoint": lambda g, m, out: ["place", str(g["trace"]), "--gpus", "2", "--out", str(out),
                                             "--checkpoint", str(m)],
    "place --model": lambda g, m, out: ["place", str(g["trace"]), "--gpus", "2", "--out", str(out), "--model", str(m)],
    "simulate --model": lambda g, m, out: ["simulate", str(g["trace"]), "--model", str(m)],
}
MODEL_CASES = [(d, c) for c in MODEL_READERS for d in (CHECKPOINTS if c == "place --checkpoint" else CONFIG_DAMAGE)]


def test_place_with_a_checkpoint_succeeds_on_the_good_inputs(good, tmp_path, capsys):
    code, _, err = run_cli(MODEL_READERS["place --checkpoint"](good, good["ckpt"], tmp_path / "p"), capsys)
    assert code == 0 and (tmp_path / "p" / "checkpoint" / "config.json").is_file(), err


@pytest.mark.parametrize("damage, cmd", MODEL_CASES, ids=lambda x: x)
def test_damaged_model_of_place_and_simulate(good, sealed, tmp_path, capsys, damage, cmd):
    make, expect = CHECKPOINTS[damage]
    model = copy(good["ckpt"], tmp_path / "model")
    make(model)
    out = tmp_path / "out"
    assert_one_line_error(MODEL_READERS[cmd](good, model, out), capsys, expect)
    assert not out.exists()


def test_analyze_with_an_sglang_map_as_placement(good, plan, sealed, tmp_path, capsys):
    """analyze --placement scores a plan folder; a map needs --gpus, which only place-eval takes: said so."""
    assert_one_line_error(["analyze", str(good["trace"]), "--placement", str(plan / "sglang.json"), "--out",
                           str(tmp_path / "r.html")], capsys, "moekit place-eval")
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("damage", TOKENIZERS)
def test_analyze_with_a_damaged_tokenizer(good, sealed, tmp_path, capsys, damage):
    make, expect = TOKENIZERS[damage]
    model = copy(good["ckpt"], tmp_path / "model")
    make(model)
    assert_one_line_error(["analyze", str(good["trace"]), "--tokenizer", str(model), "--out", str(tmp_path / "r.html")],
                          capsys, expect)
    assert not (tmp_path / "r.html").exists()


IMPORT = [({"--top-k": "0"}, "--top-k"), ({"--top-k": "-2"}, "--top-k"), ({"--top-k": "99"}, "--top-k"),
          ({"--domain": ""}, "--domain"), ({"--out": "UNDER_FILE"}, "file")]


@pytest.mark.parametrize("changes, expect", IMPORT, ids=lambda x: str(x))
def test_bad_trace_import_sglang_argument(sealed, tmp_path, capsys, changes, expect):
    import torch

    dump = tmp_path / "expert_distribution_recorder_1.pt"
    torch.save({"rank": 0, "logical_count": torch.ones(2, 3, 4, dtype=torch.int64)}, dump)
    out = tmp_path / "t"
    assert_one_line_error(_with(["trace-import-sglang", str(dump), "--out", str(out)], changes, tmp_path), capsys,
                          expect)
    assert not out.exists()


# ------------------------------------------------------------------------------------------- experts find


@pytest.mark.parametrize("damage", [d for d, (_, _, part) in TRACES.items() if part in ("meta", "ids")])
def test_experts_find_on_a_damaged_trace(good, sealed, tmp_path, capsys, damage):
    make, expect, _ = TRACES[damage]
    trace = copy(good["trace"], tmp_path / "trace")
    make(trace)
    out = tmp_path / "steer.json"
    assert_one_line_error(["experts", "find", "--contrast", str(trace), "--contrast", str(good["trace"]), "--out",
                           str(out)], capsys, expect)
    assert not out.exists()


FIND = [({"--method": "bogus"}, "bogus"), ({"--top": "0"}, "--top"), ({"--layers": "x"}, "--layers"),
        ({"--layers": "2-1"}, "empty"), ({"--layers": "7-9"}, "--layers"), ({"--action": "boost"}, "boost"),
        ({"--strength": "nan"}, "--strength"), ({"--tokens": "a,b"}, "--tokens"), ({"--out": "UNDER_FILE"}, "file"),
        ({"--out": "NOWHERE/s.json"}, "does not exist"), ({"--out": "FOLDER"}, "is a folder")]


@pytest.mark.parametrize("changes, expect", FIND, ids=lambda x: str(x))
def test_bad_experts_find_argument(good, sealed, tmp_path, capsys, changes, expect):
    out = tmp_path / "steer.json"
    argv = _with(["experts", "find", "--contrast", str(good["trace"]), "--contrast", str(good["trace"]), "--out",
                  str(out)], changes, tmp_path)
    assert_one_line_error(argv, capsys, expect)
    assert not out.exists()


def test_experts_find_on_traces_of_two_models(good, other_trace, sealed, tmp_path, capsys):
    assert_one_line_error(["experts", "find", "--contrast", str(good["trace"]), "--contrast", str(other_trace),
                           "--out", str(tmp_path / "s.json")], capsys, "different models")
    assert not (tmp_path / "s.json").exists()


def test_experts_find_needs_two_traces(good, sealed, tmp_path, capsys):
    assert_one_line_error(["experts", "find", "--contrast", str(good["trace"]), "--out", str(tmp_path / "s.json")],
                          capsys, "two traces")


# ------------------------------------------------------------------------------------------- other kinds

KINDS = {  # family -> the commands that take it (the others refuse it in one line, tests/routing/test_paths.py)
    "qwen3_vl_moe": ("info", "trace", "eval", "ablate", "prune", "merge", "quantize", "run", "serve"),  # a wrapper
    "switch_transformers": ("info", "trace", "prune"),  # encoder-decoder
    "deepseek_v4": ("info", "trace", "eval", "ablate", "quantize", "run", "serve"),  # hash-routed: no expert removal
    "inkling2_loop_text": ("info", "trace", "eval", "ablate", "prune", "merge", "quantize", "run", "serve"),  # a loop
}


@pytest.fixture(scope="module")
def kinds(good, tmp_path_factory):
    """family -> the inputs of `commands` for its checkpoint: `good`'s, with its own trace (activation statistics,
    what ablate reads) where ablate takes it."""
    root = tmp_path_factory.mktemp("kinds")
    out = {}
    for family, cmds in KINDS.items():
        ckpt = save_checkpoint(root / family, family)
        trace = root / f"{family}-trace"
        if "ablate" in cmds:
            moekit.trace.record(str(ckpt), [str(good["txt"])], trace,
                                options=TraceOptions(seq_len=32, chunk_tokens=64, activation_stats=True))
        out[family] = {**good, "ckpt": ckpt, "trace": trace}
    return out


def _kind_argv(inputs: dict, cmd: str, model: Path, tmp: Path) -> list[str]:
    return argv_of(inputs, cmd, model, tmp / "out", tmp / "store")


@pytest.mark.parametrize("family", KINDS)
def test_kinds_succeed_when_good(kinds, family, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    for cmd in KINDS[family]:
        if cmd != "serve":
            code, _, err = run_cli(_kind_argv(kinds[family], cmd, kinds[family]["ckpt"], tmp_path / cmd), capsys)
            assert code == 0, f"{cmd}: {err}"


KIND_CASES = [(family, damage, cmd) for family, cmds in KINDS.items() for damage in KIND_CHECKPOINTS for cmd in cmds
              if not (damage == "no weights" and cmd == "info")
              and not (damage == "no tokenizer" and cmd in ("info", "quantize"))
              and not (damage == "generation_config.json not JSON" and cmd not in ("run", "serve"))]


@pytest.mark.parametrize("family, damage, cmd", KIND_CASES, ids=lambda x: x)
def test_damaged_checkpoint_of_another_kind(kinds, sealed, tmp_path, capsys, family, damage, cmd):
    make, expect = KIND_CHECKPOINTS[damage]
    model = copy(kinds[family]["ckpt"], tmp_path / "model")
    make(model)
    assert_one_line_error(_kind_argv(kinds[family], cmd, model, tmp_path), capsys, expect)
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()
    assert not (tmp_path / "cache").exists()


def test_an_eof_error_is_not_reported_as_an_interrupt(good, tmp_path, capsys, monkeypatch):
    """click turns EOFError into Abort (^C); one escaping a reader (an empty file given to numpy or torch) is a bug to
    see, not `interrupted` with exit 130."""
    def truncated(*args, **kwargs):
        raise EOFError("No data left in file")

    monkeypatch.setattr(moekit.trace, "open", truncated)
    with pytest.raises(EOFError):
        moekit.cli.main(["trace-info", str(good["trace"])])
