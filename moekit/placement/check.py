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
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
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
    """Check a `moekit place` output folder against its own plan.json."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    try:
        meta = json.loads((folder / "plan.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        return [f"cannot read {folder / 'plan.json'}: {err}"]
    topo = meta["topology"]
    kw = dict(num_experts=topo["num_experts"], gpus=topo["gpus"])
    problems = sglang_file_problems(folder / "sglang.json", num_hidden_layers=meta["num_hidden_layers"],
                                    moe_layers=meta["layers"], **kw)
    t = load_file(folder / "eplb.safetensors")
    if set(t) != {"phy2log", "log2phy", "logcnt"}:
        return problems + [f"eplb.safetensors must hold phy2log, log2phy and logcnt, holds {sorted(t)}"]
    problems += eplb_problems(t["phy2log"], t["log2phy"], t["logcnt"], **kw)
    if t["phy2log"].shape[1] != topo["physical_experts"]:
        problems.append(f"phy2log has {t['phy2log'].shape[1]} slots, plan.json says {topo['physical_experts']}")
    rows = json.loads((folder / "sglang.json").read_text())[SGLANG_KEY]
    if not problems and not np.array_equal(np.asarray(rows)[meta["layers"]], t["phy2log"]):
        problems.append("sglang.json and eplb.safetensors place the experts differently")
    return problems
