"""`place` and `place_eval`: the two entry points the CLI and the Python API share.

    moekit.placement.place("out/demo-trace", "out/plan", gpus=4, method="balanced-affinity")
    moekit.placement.place_eval("out/plan", "out/heldout-trace", hardware="dgx-h100")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moekit.errors import UserError
from moekit.placement import evaluate, files
from moekit.placement.inputs import (
    ModelFacts, RoutingStats, check_plannable, model_facts, stats_from_sglang, stats_from_trace, traced_model,
)
from moekit.placement.methods import METHODS, PlanOptions, Progress, run_method
from moekit.placement.plan import Plan, Topology, default_plan


@dataclass(frozen=True)
class Cluster:
    gpus: int
    nodes: int = 1
    redundant: int = 0


@dataclass
class PlaceInputs:
    """What `check_place` opened and checked, before any routing data is read: the source (a moekit Trace, or the
    RoutingStats of an SGLang stat dump, which is small), the model facts, the topology and the decoder-layer count."""

    source: object
    facts: ModelFacts | None
    topology: Topology
    num_hidden_layers: int

    def stats(self, on_layer=None) -> RoutingStats:
        if isinstance(self.source, RoutingStats):
            return self.source
        return stats_from_trace(self.source, on_layer=on_layer)


def check_place(trace, out, cluster: Cluster, method: str = "eplb", *, model=None, checkpoint=None) -> PlaceInputs:
    """Every check `place` makes before it reads routing data or plans, each one line: the method, --out, the
    checkpoint, the trace's manifest (or the stat dump), the model against the trace, the cluster against the model."""
    METHODS.lookup(method)  # cheap checks first: method, --out, --checkpoint without redundancy
    out = Path(out)
    files.check_out(out)
    if checkpoint is not None and cluster.redundant:
        raise UserError("--checkpoint holds each expert once: use --redundant 0 (replicas need the engines' map file)")
    if checkpoint is not None:
        from moekit.models.validate import open_checkpoint

        open_checkpoint(checkpoint)  # its weights are read and rewritten: headers, shapes, MoE layers checked first
    source = open_source(Path(trace))
    facts = _facts(model or checkpoint, source)
    topo = topology(source, facts, cluster)
    return PlaceInputs(source, facts, topo, num_hidden_layers(source, facts))


def open_source(path: Path):
    """A trace folder (opened: manifest and chunk footers checked, no routing read yet) or an SGLang `stat` dump
    (read: it holds counts only)."""
    import moekit.trace

    if path.is_file():
        return stats_from_sglang(path)
    trace = moekit.trace.open(path)
    check_plannable(trace)
    return trace


def place(trace, out, cluster: Cluster, method: str = "eplb", *, model=None, checkpoint=None,
          options: PlanOptions = PlanOptions(), progress: Progress | None = None,
          inputs: PlaceInputs | None = None) -> dict:
    """Plan `cluster`'s placement from `trace` (a trace folder or an SGLang stat dump) with `method`; write the
    outputs into folder `out` and return plan.json's content. `model` (a checkpoint folder, default: `checkpoint`, else
    the traced model when its folder exists) supplies router groups, hidden size and the decoder-layer count.
    inputs: what check_place returned, when the caller ran the checks first (the CLI, before its spinner)."""
    inputs = inputs or check_place(trace, out, cluster, method, model=model, checkpoint=checkpoint)
    out, stats, facts, topo, nhl = Path(out), inputs.stats(), inputs.facts, inputs.topology, inputs.num_hidden_layers
    result = run_method(method, stats, topo, options, progress)
    result.info["model_facts"] = facts.as_dict() if facts else None
    plan = Plan(topo, result.phy2log, stats.layers, nhl, method, result.solver, result.info)
    fit = {"plan": _summary(evaluate.score(plan, stats)),
           "default": _summary(evaluate.score(default_plan(topo, stats.layers, nhl), stats))}
    assumed = None if facts else "no model config: one router group, no top-k check (pass --model MODEL)"
    report = {"inputs": {**stats.source, "tokens": stats.tokens, "model": facts.path if facts else None,
                         "assumed": assumed},
              "constraints": _constraints(topo), "options": options.__dict__, "metrics_on_fit_trace": fit,
              "checkpoint": None}
    extra = None
    if checkpoint is not None:
        from moekit.placement.checkpoint import checkpoint_order, write_permuted

        checkpoint_order(plan, topo.num_groups)  # refuse a permutation that would change the routing, before writing
        report["checkpoint"] = {"source": str(checkpoint), "folder": "checkpoint",
                                "note": "new expert id p of each MoE layer = old id phy2log[p]; serve it with the "
                                        "engines' default placement and no map file"}
        extra = lambda tmp: write_permuted(Path(checkpoint), plan, tmp / "checkpoint",  # noqa: E731
                                           {"method": method, "solver": plan.solver})
    files.write_plan_dir(plan, out, report, extra)
    return {**report, **files.plan_fields(plan), "out": str(out)}


def _facts(model, source) -> ModelFacts | None:
    """The model's facts, checked against the trace's (or dump's) MoE layers and expert count."""
    path = Path(model) if model is not None else traced_model(source)
    if path is None:
        return None
    facts = model_facts(path)
    if facts.num_experts != source.num_experts or list(facts.moe_layers) != list(source.layers):
        raise UserError(f"{path} has MoE layers {list(facts.moe_layers)} with {facts.num_experts} experts, the trace "
                        f"{source.layers} with {source.num_experts}: give the model the trace was recorded from")
    return facts


def topology(source, facts: ModelFacts | None, cluster: Cluster) -> Topology:
    """source: RoutingStats or a Trace (both have num_experts and top_k)."""
    groups = (facts.num_groups, facts.topk_group) if facts else (1, 1)
    top_k = facts.top_k if facts else source.top_k
    return Topology(source.num_experts, cluster.gpus, cluster.nodes, cluster.redundant, groups[0], groups[1], top_k)


def num_hidden_layers(source, facts: ModelFacts | None) -> int:
    n = facts.num_hidden_layers if facts else _source_layers(source)
    if n is None:
        raise UserError("cannot tell how many decoder layers the model has (SGLang's map needs a row for each, dense "
                        "ones included): pass --model MODEL")
    return n


def _source_layers(source) -> int | None:
    if isinstance(source, RoutingStats):
        return source.num_hidden_layers
    n = source.manifest.get("num_hidden_layers")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > max(source.layers, default=-1) else None


def _constraints(topo: Topology) -> dict:
    E, R, G = topo.num_experts, topo.redundant, topo.gpus
    checks = {"(E + R) % G == 0": f"({E} + {R}) % {G} == 0", "G % N == 0": f"{G} % {topo.nodes} == 0"}
    if topo.num_groups > 1:
        checks["E % n_group == 0"] = f"{E} % {topo.num_groups} == 0"
        if topo.top_k is not None:
            checks["top_k <= topk_group * E / n_group"] = (f"{topo.top_k} <= {topo.topk_group} * {E} / "
                                                           f"{topo.num_groups}")
    checks["eplb_policy"] = "hierarchical" if topo.hierarchical() else "global"
    return checks


SUMMARY_KEYS = ("vllm_balancedness", "sglang_balancedness", "sglang_balancedness_logged", "max_over_mean",
                "cross_gpu_transitions", "cross_gpu_fraction", "cross_node_fraction", "dispatch_gpus_per_token_layer",
                "dispatch_inter_node_gpus_per_token_layer", "dispatch_bytes_per_token", "nodes_per_token",
                "moe_step_ms", "moe_compute_ms", "moe_network_ms")


def _summary(score: dict) -> dict:
    return {k: score[k] for k in SUMMARY_KEYS if k in score}


@dataclass
class EvalInputs:
    """What `check_place_eval` opened and checked: the plan (on the trace's MoE layers), the hardware profile, the
    trace (opened, its routing not read yet) and the model facts."""

    plan: Plan
    profile: object
    trace: object
    facts: ModelFacts | None


def check_place_eval(plan_path, trace, *, hardware: str | None = "dgx-h100", batch_tokens: int | None = None,
                     model=None, gpus: int | None = None, nodes: int = 1) -> EvalInputs:
    """Every check `place_eval` makes before it reads routing data, each one line."""
    import moekit.trace

    plan = files.read_plan(Path(plan_path), gpus, nodes)
    if batch_tokens is not None and batch_tokens < 1:
        raise UserError(f"--batch-tokens must be >= 1, got {batch_tokens}")
    profile = _profile(hardware)
    t = moekit.trace.open(Path(trace))
    check_plannable(t)
    plan = _on_layers(plan, t, plan_path)
    if plan.topology.num_experts != t.num_experts or list(plan.layers) != list(t.layers):
        raise UserError(f"the plan places {plan.topology.num_experts} experts in MoE layers {list(plan.layers)}, the "
                        f"trace {trace} has {t.num_experts} in {t.layers}: score it on a trace of the same model")
    facts = _facts(model, t) if model is not None else _plan_facts(plan, t)
    return EvalInputs(plan, profile, t, facts)


def place_eval(plan_path, trace, *, hardware: str | None = "dgx-h100", batch_tokens: int | None = None,
               model=None, gpus: int | None = None, nodes: int = 1, inputs: EvalInputs | None = None) -> dict:
    """Score a plan (a `moekit place` folder, or an SGLang map with `gpus`) and the engines' default placement on a
    trace (ideally held out): loads and balancedness, transitions, dispatch, nodes per token, estimated step time.
    inputs: what check_place_eval returned, when the caller ran the checks first."""
    inputs = inputs or check_place_eval(plan_path, trace, hardware=hardware, batch_tokens=batch_tokens, model=model,
                                        gpus=gpus, nodes=nodes)
    plan, profile, t, facts = inputs.plan, inputs.profile, inputs.trace, inputs.facts
    stats = stats_from_trace(t)
    ids, src = None, None
    if t.kind == "tokens":
        ids = [t.ids(l).astype(np.int64) for l in t.layers]
        src = t.seq_id  # one request per sequence, requests spread over the ranks: src = seq_id mod G
    cost = _cost(profile, facts, plan.topology.gpus, batch_tokens)
    value_bytes = facts.hidden_size * facts.dtype_bytes if facts else None
    default = default_plan(plan.topology, plan.layers, plan.num_hidden_layers)
    return {"plan": evaluate.score(plan, stats, ids, src, value_bytes, cost),
            "default": evaluate.score(default, stats, ids, src, value_bytes, cost),
            "trace": str(trace), "tokens": stats.tokens, "topology": plan.topology.as_dict(),
            "hardware": profile.as_dict() if profile else None, "batch_tokens": cost.batch_tokens if cost else None,
            "model_facts": facts.as_dict() if facts else None, "conventions": CONVENTIONS}


CONVENTIONS = {
    "replicas": "a selection of expert e goes to each of its replicas with probability 1 / cnt_e (EPLB's load "
                "model; SGLang dynamic / vLLM random replica choice in expectation); exact without redundancy",
    "sglang_balancedness": "mean over MoE layers of (mean_g load + 1e-5) / (max_g load + 1e-5) (SGLang "
                           "compute_utilization_rate); _logged: averaged over all decoder layers, dense = 1.0, "
                           "as SGLang's [Expert Balancedness] log line",
    "vllm_balancedness": "sum_l mean_g load / sum_l max_g load over MoE layers (vLLM EPLB step log line)",
    "cross_gpu_transitions": "ExFlow (arXiv 2401.08383): share of consecutive-MoE-layer steps whose experts sit on "
                             "different GPUs, inter-node steps counted twice; a step weighs 1 over its K x K' pairs",
    "dispatch": "distinct destination GPUs other than the token's source GPU (seq_id mod G) per token and MoE layer; "
                "bytes = that x hidden size x bytes per value, summed over MoE layers (combine sends as much back)",
    "nodes_per_token": "distinct nodes holding a token's experts, per MoE layer",
    "moe_step_ms": "per MoE layer max over GPUs of max(2 x expert params x tokens / FLOP/s, weights of experts hit / "
                   "HBM GB/s) plus max over source GPUs of dispatch + combine bytes over NVLink / RDMA, summed over "
                   "MoE layers, for batch_tokens tokens spread evenly over the GPUs; no overlap",
}


def _profile(hardware):
    if hardware is None:
        return None
    from moekit.runtime.hardware import load_profile

    profile = load_profile(hardware)
    if profile.intra_node_gbs is None or profile.inter_node_gbs is None:
        raise UserError(f"hardware profile {profile.name!r} has no network numbers: use dgx-a100 or dgx-h100, or add "
                        f"intra_node_gbs and inter_node_gbs to the YAML file")
    return profile


def _on_layers(plan: Plan, stats, path) -> Plan:
    """An SGLang map read from JSON covers every decoder layer: keep the trace's MoE layers (stats: RoutingStats or
    a Trace)."""
    if plan.method != "sglang map":
        return plan
    if max(stats.layers) >= len(plan.phy2log) or plan.topology.num_experts != stats.num_experts:
        raise UserError(f"{path}: the map has {len(plan.phy2log)} rows of {plan.topology.num_experts} experts; the "
                        f"trace's MoE layers are {stats.layers} with {stats.num_experts} experts: give the map of the "
                        f"model the trace was recorded from")
    return Plan(plan.topology, plan.phy2log[stats.layers], stats.layers, len(plan.phy2log), plan.method, plan.solver)


def _plan_facts(plan: Plan, stats) -> ModelFacts | None:
    """The model facts stored with the plan, else the traced model's."""
    facts = plan.info.get("model_facts")
    if facts:
        return ModelFacts(**{**facts, "moe_layers": tuple(facts["moe_layers"])})
    path = traced_model(stats)
    return model_facts(path) if path is not None else None


def _cost(profile, facts: ModelFacts | None, gpus: int, batch_tokens: int | None):
    if profile is None or facts is None:
        return None
    return evaluate.CostModel(profile.compute_tflops, profile.fast_gbs, profile.intra_node_gbs, profile.inter_node_gbs,
                              facts.hidden_size, facts.expert_params, facts.dtype_bytes,
                              batch_tokens or 128 * gpus, profile.name)
