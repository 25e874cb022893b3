"""One self-contained HTML file from the routing-analysis results (moekit.analysis.run.analyze_arrays).

Figures are PNGs embedded as base64 data URIs, styles are inline: the file opens offline and can be mailed as is.
Written atomically (moekit.files: temporary file in the target folder, then os.replace), so a reader never sees half
a report.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moekit import files
from moekit.report import figures

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f0f0f0; }
td.l, th.l { text-align: left; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #555; max-width: 60em; }
.note { font-size: 0.8em; color: #555; }
"""


def render_report(results: dict, out_path, title: str = "moekit routing analysis") -> Path:
    """Write the report for `results` to out_path (one HTML file, no external assets) and return the path."""
    if not isinstance(results, dict) or "layers" not in results:
        raise ValueError("results must be the dict returned by moekit.analysis.run.analyze_arrays")
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise ValueError(f"folder {out_path.parent} does not exist")
    body = "\n".join(part for part in _sections(results) if part)
    doc = (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{_e(title)}</title>\n"
           f"<style>{CSS}</style>\n</head>\n<body>\n<h1>{_e(title)}</h1>\n{body}\n</body>\n</html>\n")
    files.write_bytes(out_path, doc.encode())
    return out_path


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(x, digits: int = 3) -> str:
    if x is None:
        return "&ndash;"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    return f"{float(x):.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence], left: int = 1, table_id: str = "") -> str:
    ident = f' id="{_e(table_id)}"' if table_id else ""
    head = "".join(f'<th class="l">{_e(h)}</th>' if i < left else f"<th>{_e(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>\n" for row in rows)
    return f"<table{ident}>\n<tr>{head}</tr>\n{body}</table>"


def _figure(fig_id: str, fig, caption: str) -> str:
    data = base64.b64encode(figures.to_png(fig)).decode("ascii")
    return (f'<figure id="{_e(fig_id)}">\n<img alt="{_e(caption)}" src="data:image/png;base64,{data}">\n'
            f"<figcaption>{_e(caption)}</figcaption>\n</figure>")


def _sections(res: dict):
    names = res.get("layer_names") or [str(i) for i in range(res["n_layers"])]
    yield (f'<p>{res["n_tokens"]} tokens in {res["n_sequences"]} sequences, {res["n_layers"]} MoE layers, '
           f'{res["n_experts"]} experts per layer.</p>')
    yield "<h2>Summary per layer</h2>"
    yield _summary_table(res, names)
    yield "<h2>Expert usage</h2>"
    yield _figure("fig-usage", figures.usage_heatmap([row["frequency"] for row in res["layers"]], names),
                  "Expert load per layer: selection frequency f_e times E (1 = even load; 0 = never selected).")
    if res.get("domains"):
        yield from _domain_sections(res["domains"], names)
    if res.get("affinity"):
        yield "<h2>Inter-layer affinity</h2>"
        aff = res["affinity"]
        yield _figure("fig-affinity", figures.matrix_grid(
            [a["matrix"] for a in aff], [f"layer {names[a['from']]} -> {names[a['to']]}" for a in aff],
            "expert in next layer (q)", "expert (p)", "P(q | p)", vmin=0.0),
            "P(e_{l+1} = q | e_l = p) from all pairs of one token's selections in consecutive layers (ExFlow, "
            "arXiv 2401.08383). Blank rows: expert p never selected.")
    yield "<h2>Local routing consistency</h2>"
    loc, cache = res["locality"], res["cache"]
    yield _figure("fig-lrc", figures.lrc_curves(loc, names, cache["multiples"]),
                  "SRP and SCH versus segment length m (arXiv 2505.16056): windows of m tokens inside a sequence; "
                  "SCH with the released code's conventions. Higher = more local routing, better for offloading.")
    yield "<h2>Expert-cache hit rate</h2>"
    yield _figure("fig-hit-rates", figures.hit_rate_curves(cache, loc, cache["multiples"]),
                  "Hit rate versus per-layer cache size, mean over layers. All curves use SCH's conventions (per "
                  "sequence, a token judged against the cache before it, the first C distinct experts count as "
                  "hits). opt is the offline ceiling under these conventions; Belady MIN is the paper's baseline "
                  "and can fall below LFU or SCH here.")
    yield _cache_table(cache, loc, names)
    yield _super_expert_section(res.get("super_experts"))
    if res.get("placement"):
        yield _placement_section(res["placement"], names)
    if res.get("npmi"):
        yield _npmi_section(res["npmi"], names)
    yield _conventions(res.get("conventions", {}))


def _summary_table(res: dict, names) -> str:
    loc = res["locality"]
    ms = list(loc["segment_lengths"])
    nmi = res["domains"]["nmi"] if res.get("domains") else [None] * len(names)
    mass = {a["from"]: a["topk_mass"] for a in res.get("affinity", [])}
    header = ["layer", "K", "entropy (bits)", "token entropy", "LBL global", "LBL seq", "MaxVio global",
              "MaxVio seq", "unused"] + [f"SRP m={m}" for m in ms] + ["domain NMI", "affinity top-k mass"]
    rows = []
    for i, (name, row) in enumerate(zip(names, res["layers"])):
        rows.append([_e(name), _num(row["top_k"]), _num(row["layer_entropy_bits"]),
                     f'{_num(row["token_entropy_bits"])} <span class="note">{_e(row["entropy_source"])}</span>',
                     _num(row["global_lbl"]), _num(row["sequence_lbl"]), _num(row["max_vio_global"]),
                     _num(row["max_vio_sequence"]), _num(row["unused_experts"])]
                    + [_num(v) for v in loc["srp"][i]] + [_num(nmi[i]), _num(mass.get(i))])
    return _table(header, rows, table_id="table-summary")


def _domain_sections(dom: dict, names):
    yield "<h2>Domain specialisation</h2>"
    yield _figure("fig-domain-usage", figures.matrix_grid(
        dom["usage"], [f"layer {n}" for n in names], "expert", "domain", "share of the domain's selections",
        ylabels=dom["names"], vmin=0.0, cmap="viridis"),
        "Per-domain expert frequency (each row sums to 1).")
    yield _figure("fig-domain-jsd", figures.matrix_grid(
        dom["jsd"], [f"layer {n}" for n in names], "domain", "domain", "JS divergence (bits)",
        ylabels=dom["names"], vmin=0.0, vmax=1.0),
        "Jensen-Shannon divergence between domain usage vectors (bits, 0 = same experts, 1 = disjoint).")


def _cache_table(cache: dict, loc: dict, names) -> str:
    header = ["layer", "policy"] + [f"{k}x" for k in cache["multiples"]]
    rows = []
    for i, name in enumerate(names):
        for policy in cache["policies"]:
            rows.append([_e(name), _e(policy)] + [_num(v) for v in cache[policy][i]])
        for m, curve in zip(loc["segment_lengths"], loc["sch"][i]):
            rows.append([_e(name), f"SCH m={m}"] + [_num(v) for v in curve])
    return (f"<details><summary>Hit rates per layer</summary>\n{_table(header, rows, left=2, table_id='table-cache')}"
            "\n</details>")


def _super_expert_section(rows) -> str:
    if rows is None:
        return ""
    head = "<h2>Super experts</h2>\n"
    if not rows:
        return head + '<p id="table-super-experts">No super experts (arXiv 2507.23279 criteria) found.</p>'
    table = _table(["layer", "expert", "max |output|"], [[_num(r["layer"]), _num(r["expert"]), _num(r["value"], 2)]
                                                         for r in rows], table_id="table-super-experts")
    return head + table + ('<p class="note">First 75% of layers; max |down_proj output| above the 99.5th percentile '
                           "of all experts and above max / 10 (arXiv 2507.23279).</p>")


PLACEMENT_ROWS = (("vLLM balancedness (sum mean / sum max)", "vllm_balancedness", 4),
                  ("SGLang balancedness (mean of per-layer mean / max)", "sglang_balancedness", 4),
                  ("max / mean GPU load", "max_over_mean", 4),
                  ("cross-GPU transitions (ExFlow; inter-node x 2)", "cross_gpu_transitions", 4),
                  ("cross-node transitions", "cross_node_fraction", 4),
                  ("dispatch GPUs per token and layer", "dispatch_gpus_per_token_layer", 3),
                  ("dispatch bytes per token", "dispatch_bytes_per_token", 0),
                  ("nodes per token and layer", "nodes_per_token", 3),
                  ("estimated MoE step (ms)", "moe_step_ms", 4))


def _placement_section(pl: dict, names) -> str:
    """Expert placement (`moekit analyze --placement PLAN`): the plan against the engines' default placement."""
    plan, default, topo = pl["plan"], pl["default"], pl["topology"]
    rows = [[_e(label), _num(plan.get(key), digits), _num(default.get(key), digits)]
            for label, key, digits in PLACEMENT_ROWS if plan.get(key) is not None]
    parts = ["<h2>Expert placement</h2>",
             (f'<p>{_e(plan["method"])} ({_e(plan["solver"])}) on {topo["gpus"]} GPUs, {topo["nodes"]} node(s), '
              f'{topo["redundant"]} redundant experts, scored on this trace, against the engines\' default '
              f"(contiguous) placement.</p>"),
             _table(["metric", "plan", "default"], rows, table_id="table-placement")]
    loads = [[np.asarray(r["gpu_load"]) / max(np.mean(r["gpu_load"]), 1e-12) for r in s["layers"]]
             for s in (plan, default)]
    layer_names = [names[i] if i < len(names) else str(r["layer"]) for i, r in enumerate(plan["layers"])]
    parts.append(_figure("fig-placement-load", figures.matrix_grid(
        loads, [f"plan: {plan['method']}", "default placement"], "GPU", "MoE layer", "GPU load / mean",
        ylabels=layer_names, cmap="viridis"),
        "Token-expert assignments per GPU and MoE layer, divided by the layer's mean (1 = perfectly balanced); "
        "replicas share their expert's load equally."))
    per_layer = [[_e(n), _num(a["max_over_mean"]), _num(b["max_over_mean"]), _num(a.get("dispatch_gpus")),
                  _num(b.get("dispatch_gpus"))] for n, a, b in zip(layer_names, plan["layers"], default["layers"])]
    parts.append(_table(["layer", "max/mean plan", "max/mean default", "dispatch GPUs plan", "dispatch GPUs default"],
                        per_layer, table_id="table-placement-layers"))
    conv = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in pl.get("conventions", {}).items())
    return "\n".join(parts) + (f'\n<ul class="note">{conv}</ul>' if conv else "")


def _npmi_section(npmi: list, names) -> str:
    parts = ["<h2>Token-expert association (nPMI)</h2>",
             (f'<p class="note">Most associated token ids per expert (RICE, arXiv 2505.14681); tokens seen fewer than '
             f'{npmi[0]["min_count"]} times are skipped. Token strings appear when results carry them.</p>')]
    for name, layer in zip(names, npmi):
        tokens = layer.get("tokens") or layer["token_ids"]
        rows = []
        for e, (toks, vals) in enumerate(zip(tokens, layer["npmi"])):
            cells = [f"{_e(t)} ({_num(v, 2)})" for t, v in zip(toks, vals) if v is not None and t not in (-1, None)]
            rows.append([_num(e), ", ".join(cells) or "&ndash;"])
        parts.append(f"<details><summary>layer {_e(name)}</summary>\n"
                     f"{_table(['expert', 'tokens (nPMI)'], rows, left=2)}\n</details>")
    return "\n".join(parts)


def _conventions(conv: dict) -> str:
    if not conv:
        return ""
    items = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in conv.items())
    return f'<h2>Definitions and conventions</h2>\n<ul class="note">{items}</ul>'
