"""A structural checker for placement files, written from the engines' rules (not from moekit's writer):

SGLang (`--init-expert-location FILE.json`, srt/eplb/expert_location.py):
- the JSON object has exactly one key, `physical_to_logical_map` (it is passed as `init_by_mapping(**d)`);
- one row per decoder layer (`num_hidden_layers`, dense layers included), all rows of one length P;
- P = E + --ep-num-redundant-experts and P % ep_size == 0 (`_init_common` asserts it);
- integer entries in [0, E), and every logical expert in every row (the dispatch-map builder asserts there is no -1);
- dense layers keep the trivial row arange(P) % E.
EPLB's own tensors (deepseek-ai/EPLB `rebalance_experts`; what vLLM's EplbState holds): phy2log [L, P], log2phy
[L, E, X] padded with -1, logcnt [L, E], over MoE layers only, mutually consistent, X = max replica count.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SGLANG_KEY = "physical_to_logical_map"


def sglang_map_problems(m, *, num_hidden_layers: int, num_experts: int, gpus: int, moe_layers: list[int]) -> list[str]:
    """Everything SGLang would reject (or silently mis-serve) in a physical_to_logical_map."""
    if not isinstance(m, list) or not all(isinstance(r, list) for r in m):
        return ["physical_to_logical_map must be a list of rows (lists)"]
    problems = []
    if len(m) != num_hidden_layers:
        problems.append(f"{len(m)} rows, the model has {num_hidden_layers} decoder layers")
    lengths = {len(r) for r in m}
    if len(lengths) != 1:
        return problems + [f"rows have different lengths {sorted(lengths)}"]
    P = lengths.pop()
    if P % gpus:
        problems.append(f"{P} physical experts per row do not split over {gpus} GPUs")
    if P < num_experts:
        problems.append(f"{P} slots per row cannot hold {num_experts} experts")
    for i, row in enumerate(m):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in row):
            problems.append(f"row {i}: entries must be integers")
            continue
        if any(v < 0 or v >= num_experts for v in row):
            problems.append(f"row {i}: entries outside [0, {num_experts})")
        missing = set(range(num_experts)) - set(row)
        if missing:
            problems.append(f"row {i}: experts {sorted(missing)[:8]} have no slot")
        if i not in moe_layers and row != [p % num_experts for p in range(P)]:
            problems.append(f"row {i} is a dense layer but not the trivial row")
    return problems


def sglang_file_problems(path: Path, **kw) -> list[str]:
    try:
        d = _read_json(path)
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, UnicodeDecodeError
        return [f"cannot read {path} as JSON: {err}"]
    if not isinstance(d, dict) or set(d) != {SGLANG_KEY}:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        return [f"{path} must be an object with the single key {SGLANG_KEY!r}, has {keys}"]
    return sglang_map_problems(d[SGLANG_KEY], **kw)


def eplb_problems(phy2log: np.ndarray, log2phy: np.ndarray, logcnt: np.ndarray, *, num_experts: int,
                  gpus: int) -> list[str]:
    """EPLB's three tensors: shapes, dtypes and mutual consistency."""
    problems = []
    for name, t, nd in (("phy2log", phy2log, 2), ("log2phy", log2phy, 3), ("logcnt", logcnt, 2)):
        if t.ndim != nd or t.dtype != np.int64:
            problems.append(f"{name} must be int64 with {nd} dimensions, is {t.dtype} {t.shape}")
    if problems:
        return problems
    L, P = phy2log.shape
    if L == 0 or P == 0:
        return [f"phy2log {phy2log.shape} places no expert"]
    if P % gpus:
        problems.append(f"phy2log has {P} slots, not a multiple of {gpus} GPUs")
    if logcnt.shape != (L, num_experts) or log2phy.shape[:2] != (L, num_experts):
        return problems + [f"shapes disagree: phy2log {phy2log.shape}, log2phy {log2phy.shape}, logcnt {logcnt.shape}"]
    if log2phy.shape[2] != logcnt.max():
        problems.append(f"log2phy holds {log2phy.shape[2]} replicas per expert, the most replicated has {logcnt.max()}")
    for l in range(L):
        if (phy2log[l] < 0).any() or (phy2log[l] >= num_experts).any():
            problems.append(f"layer {l}: phy2log entries outside [0, {num_experts})")
            continue
        if not np.array_equal(np.bincount(phy2log[l], minlength=num_experts), logcnt[l]):
            problems.append(f"layer {l}: logcnt is not the replica count of phy2log")
        if (logcnt[l] < 1).any():
            problems.append(f"layer {l}: experts {np.flatnonzero(logcnt[l] < 1)[:8].tolist()} have no replica")
        for e in range(num_experts):
            slots, rest = log2phy[l, e, : logcnt[l, e]], log2phy[l, e, logcnt[l, e]:]
            if sorted(slots.tolist()) != np.flatnonzero(phy2log[l] == e).tolist() or (rest != -1).any():
                problems.append(f"layer {l}, expert {e}: log2phy does not list exactly its slots, padded with -1")
                break
    return problems


def plan_dir_problems(folder: Path) -> list[str]:
    """Check a `moekit place` output folder against its own plan.json (every field a reader uses, then the files)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(folder)
    try:
        meta = _read_json(folder / "plan.json")
    except (OSError, ValueError) as err:
        return [f"cannot read {folder / 'plan.json'}: {err}"]
    problem = plan_meta_problem(meta)
    if problem:
        return [f"plan.json: {problem}"]
    topo = meta["topology"]
    kw = dict(num_experts=topo["num_experts"], gpus=topo["gpus"])
    problems = sglang_file_problems(folder / "sglang.json", num_hidden_layers=meta["num_hidden_layers"],
                                    moe_layers=meta["layers"], **kw)
    try:
        t = load_file(folder / "eplb.safetensors")
    except (OSError, SafetensorError) as err:
        return problems + [f"cannot read eplb.safetensors: {str(err).splitlines()[0] if str(err) else err}"]
    if set(t) != {"phy2log", "log2phy", "logcnt"}:
        return problems + [f"eplb.safetensors must hold phy2log, log2phy and logcnt, holds {sorted(t)}"]
    problems += eplb_problems(t["phy2log"], t["log2phy"], t["logcnt"], **kw)
    if t["phy2log"].shape[1:] != (topo["physical_experts"],) or len(t["phy2log"]) != len(meta["layers"]):
        problems.append(f"phy2log has shape {list(t['phy2log'].shape)}, plan.json says {len(meta['layers'])} MoE "
                        f"layers x {topo['physical_experts']} slots")
    if not problems:
        rows = _read_json(folder / "sglang.json")[SGLANG_KEY]
        if not np.array_equal(np.asarray(rows)[meta["layers"]], t["phy2log"]):
            problems.append("sglang.json and eplb.safetensors place the experts differently")
    return problems


MAX_EXPERTS = 1 << 16  # logical experts per layer: more than any released model, and few enough to check one by one


def plan_meta_problem(meta) -> str | None:
    """What is wrong with a parsed plan.json (the fields readers rely on), or None."""
    def count(x, low: int) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and low <= x <= MAX_EXPERTS * 64

    if not isinstance(meta, dict):
        return "not an object"
    topo = meta.get("topology")
    if not isinstance(topo, dict):
        return "topology is not an object"
    for key, low in (("num_experts", 1), ("gpus", 1), ("nodes", 1), ("redundant", 0), ("num_groups", 1),
                     ("topk_group", 1), ("physical_experts", 1)):
        if not count(topo.get(key), low):
            return f"topology.{key} {topo.get(key)!r} is not a count >= {low}"
    if topo["num_experts"] > MAX_EXPERTS or topo["physical_experts"] != topo["num_experts"] + topo["redundant"]:
        return "topology.physical_experts is not num_experts + redundant"
    if topo.get("top_k") is not None and not count(topo["top_k"], 1):
        return f"topology.top_k {topo['top_k']!r} is not a count"
    layers, nhl = meta.get("layers"), meta.get("num_hidden_layers")
    if not isinstance(layers, list) or not layers or not all(count(l, 0) for l in layers) \
            or layers != sorted(set(layers)):
        return "layers is not an ascending list of layer indices"
    if not count(nhl, 1) or nhl <= layers[-1]:
        return f"num_hidden_layers {nhl!r} does not cover the layers"
    for key in ("method", "solver"):
        if not isinstance(meta.get(key), str):
            return f"{key} is not text"
    if not isinstance(meta.get("info", {}), dict):
        return "info is not an object"
    return None


def _read_json(path: Path):
    return json.loads(Path(path).read_bytes().decode("utf-8"))
