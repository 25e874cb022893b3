"""The output folder of `moekit place`, written atomically (a temporary sibling folder, checked, then renamed):

  sglang.json        {"physical_to_logical_map": [[...] x num_hidden_layers]} for SGLang --init-expert-location
  eplb.safetensors   phy2log [L, P], log2phy [L, E, X] (-1 padded), logcnt [L, E]: EPLB's tensors, MoE layers only
  plan.json          method, solver, inputs, topology and constraints, fit metrics (plan and the default placement)
  checkpoint/        with --checkpoint: the model with experts permuted so that contiguous placement is the plan
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from moekit.errors import UserError
from moekit.placement.check import SGLANG_KEY, plan_dir_problems
from moekit.placement.plan import Plan, Topology

SCHEMA = "moekit.placement/1"


def check_out(out: Path) -> None:
    """Cheap: refuse an --out that holds something, or that cannot be written (under a file, no permission), before
    any work."""
    from moekit.files import check_out as check_writable

    check_writable(out, exist_ok=True)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty: choose another --out or remove it")


def write_plan_dir(plan: Plan, out: Path, report: dict, extra: Callable[[Path], None] | None = None) -> Path:
    """Write every output file of `plan` into folder `out`; `report` becomes plan.json (plus the plan's own fields),
    `extra(folder)` writes more (the permuted checkpoint). Nothing is left at `out` unless all of it was written and
    passed the structural check."""
    from safetensors.numpy import save_file

    out = Path(out)
    check_out(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        (tmp / "sglang.json").write_text(json.dumps({SGLANG_KEY: plan.sglang_map().tolist()}) + "\n")
        save_file({"phy2log": plan.phy2log, "log2phy": plan.log2phy, "logcnt": plan.logcnt}, tmp / "eplb.safetensors",
                  metadata={"format": SCHEMA, "layers": json.dumps(plan.layers)})
        (tmp / "plan.json").write_text(json.dumps({**report, **plan_fields(plan)}, indent=1, default=_json) + "\n")
        if extra is not None:
            extra(tmp)
        problems = plan_dir_problems(tmp)
        assert not problems, problems  # the writer and the engines' rules disagree: a bug, never the user's input
        if out.exists():
            out.rmdir()  # empty (check_out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def plan_fields(plan: Plan) -> dict:
    return {"schema": SCHEMA, "method": plan.method, "solver": plan.solver, "topology": plan.topology.as_dict(),
            "layers": list(plan.layers), "num_hidden_layers": plan.num_hidden_layers, "info": plan.info}


def _json(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def read_plan(path: Path, gpus: int | None = None, nodes: int = 1) -> Plan:
    """A `moekit place` output folder (or its plan.json), or an SGLang map (sglang.json; needs gpus)."""
    path = Path(path)
    folder = path.parent if path.name == "plan.json" else path
    for option, value in (("--gpus", gpus), ("--nodes", nodes)):
        if value is not None and value < 1:
            raise UserError(f"{option} must be >= 1, got {value}")
    if folder.is_dir() and (folder / "plan.json").is_file():
        plan = _read_dir(folder)
        # --gpus / --nodes describe an SGLang map; a plan folder records its own: a different value is a mistake
        for option, value, planned in (("--gpus", gpus, plan.topology.gpus), ("--nodes", nodes, plan.topology.nodes)):
            if value is not None and value != planned and not (option == "--nodes" and value == 1):
                raise UserError(f"{option} {value}: the plan at {folder} is for {planned}; {option} is for an SGLang "
                                f"map JSON, leave it out for a `moekit place` folder")
        return plan
    if path.is_file() and path.suffix == ".json":
        return _read_sglang(path, gpus, nodes)
    raise UserError(f"no placement plan at {path}: give a `moekit place` output folder or an SGLang "
                    f"physical_to_logical_map JSON file (with --gpus)")


def _read_dir(folder: Path) -> Plan:
    problems = plan_dir_problems(folder)
    if problems:
        raise UserError(f"{folder} is not a valid placement plan ({problems[0]}): write it again with `moekit place`")
    meta = json.loads((folder / "plan.json").read_bytes().decode("utf-8"))  # checked by plan_dir_problems
    t = meta["topology"]
    topo = Topology(t["num_experts"], t["gpus"], t["nodes"], t["redundant"], t["num_groups"], t["topk_group"],
                    t["top_k"])
    rows = np.asarray(json.loads((folder / "sglang.json").read_text())[SGLANG_KEY])
    return Plan(topo, rows[meta["layers"]], meta["layers"], meta["num_hidden_layers"], meta["method"], meta["solver"],
                meta.get("info", {}))


def _read_sglang(path: Path, gpus: int | None, nodes: int) -> Plan:
    from moekit.placement.check import sglang_map_problems

    if gpus is None:
        raise UserError(f"{path} is an SGLang map: pass --gpus (its EP size) to score it")
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
        rows = d[SGLANG_KEY]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, IndexError):
        raise UserError(f"{path} is not an SGLang map {{\"{SGLANG_KEY}\": [[...], ...]}}") from None
    try:
        arr = np.asarray(rows)
    except (ValueError, OverflowError):  # rows of different lengths, numbers beyond int64
        arr = np.zeros(0)
    if arr.ndim != 2 or not arr.size or not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"{path}: {SGLANG_KEY} must be a rectangular list of integer rows")
    if int(arr.min()) < 0 or int(arr.max()) >= arr.shape[1]:
        raise UserError(f"{path}: {SGLANG_KEY} entries must be logical expert ids in [0, slots per row)")
    E = int(arr.max()) + 1
    trivial = (np.arange(arr.shape[1]) % E)[None]
    moe = [i for i, r in enumerate(arr) if not np.array_equal(r, trivial[0])] or list(range(len(arr)))
    problems = sglang_map_problems(rows, num_hidden_layers=len(rows), num_experts=E, gpus=gpus, moe_layers=moe)
    if problems:
        raise UserError(f"{path}: SGLang would reject this map ({problems[0]})")
    topo = Topology(E, gpus, nodes, arr.shape[1] - E)
    return Plan(topo, arr, list(range(len(arr))), len(arr), "sglang map", f"read from {path.name}")
