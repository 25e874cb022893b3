"""The realistic routing workload of the offload benchmark (and the serve and cache benchmarks that reuse it): a trained
model's routing, recorded on held-out text, replayed on a model of another size through moekit's `replay=TRACE`
routing policy (moekit/routing/replay.py).

Trace: demo/model (a trained Qwen3-MoE, 4 MoE layers x 32 experts, top-4) over the first TOKENS // 8 tokens of each of
the 8 demo-corpus held-out domains, windows of SEQ_LEN tokens; recorded once into the work folder with
moekit.trace.record, reused while complete and recorded by the same demo model and options (a changed model is an
error naming the folder, never a silent reuse).

Replay: every router of the target model follows the trace's expert ids, mapped to its expert count and top-k (the
mapping of docs/routing.md: trace expert e owns model experts [e E_m / E_t, (e + 1) E_m / E_t); with E_m = c E_t and
K_m = c K_t, as for the offload benchmark's synthetic model, 64 experts top-8 = 2 x (32, top-4), every selection is
one trace expert's whole block). The weights are the target's own rule on the replayed set. The policy is applied by
router hooks, so both systems of a benchmark (moekit's runtime and accelerate) run exactly the same routing, the
same expert traffic and, with the same sampler, the same tokens.

Per prompt: prompt p of n replays from the start of the first traced window of the trace's domain p * D / n (of D, in
traced order: prose and french for the default 2 prompts) that holds the prompt's prefill and decode rows, so the
prompts cover different domains and each stays inside one traced window (the stream the policy would otherwise read
wraps across windows and domains).

`Replayed.executed()` is the routing the routers returned (a hook after the policy's), which the benchmark compares
with the trace rows it replayed (benchmarks/_workload.py `locality_kept`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("prose", "code", "math", "german", "french", "russian", "japanese", "dialogue")  # demo/corpus/heldout
TOKENS = 4096
SEQ_LEN = 256


def demo_trace(work: Path, model: Path = ROOT / "demo/model") -> Path:
    """The demo model's held-out trace under `work` (recorded on first use, a minute or so on 2 cores; resumable)."""
    import moekit.trace

    out = work / f"demo-trace-heldout-{TOKENS}"
    files = [str(ROOT / "demo/corpus/heldout" / f"{d}.txt") for d in DOMAINS]  # absolute: same run from any cwd
    moekit.trace.record(model, files, out, options=moekit.trace.TraceOptions(seq_len=SEQ_LEN, max_tokens=TOKENS),
                        resume=True)
    return out


class ReplaySource:
    """A recorded trace to replay on a benchmark's model: `attach(view, rows)` per loaded model."""

    def __init__(self, trace_dir: Path):
        import moekit.trace

        self.path = Path(trace_dir)
        self.trace = moekit.trace.open(self.path)
        self.spec = f"replay={self.path}"

    def starts(self, n_prompts: int, rows: list[int]) -> list[int]:
        """Trace row where prompt p's replay begins: the first window holding rows[p] rows of the trace's domain
        p * D / n (D domains, in the order they were traced); of any domain when that one has no such window; row 0
        when no window is long enough (the replay then runs on into the next window)."""
        from moekit.routing.replay import sequence_starts

        seq, names = self.trace.seq_id, self.trace.manifest.get("domain_names") or [""]
        first = sequence_starts(self.trace)  # [S] first row of each window
        length = np.diff(np.r_[first, seq.size])  # [S]
        domain = self.trace.domain[first] if len(names) > 1 else np.zeros(first.size, np.int64)  # [S]
        out = []
        for p in range(n_prompts):
            fits = length >= rows[p]
            pick = np.flatnonzero(fits & (domain == p * len(names) // n_prompts))
            pick = pick if pick.size else np.flatnonzero(fits)
            out.append(int(first[pick[0]]) if pick.size else 0)
        return out

    def attach(self, view, starts: list[int]) -> Replayed:
        return Replayed(self, view, starts)


class Replayed:
    """The replay policy on one loaded model's routers, and a record of what they returned, per prompt and layer."""

    def __init__(self, source: ReplaySource, view, starts: list[int]):
        import moekit.routing
        from moekit.routing.replay import Replay

        self.source, self.view, self.starts = source, view, starts
        self.routing = moekit.routing.parse(source.spec)
        self.policy = self.routing.find(Replay)
        self.hooks = moekit.routing.attach(view)
        self.hooks.set_all(self.routing)  # binds: the trace mapped to this model once
        self.seen: list[dict[int, list[np.ndarray]]] = []
        self._capture = [m.router.register_forward_hook(self._hook(m)) for m in view.layers]  # after the policy's

    def _hook(self, layer):
        def hook(module, args, out):
            ids = layer.parse_router_output(out)[2]  # [T, K] as the experts will receive them
            self.seen[-1][layer.index].append(ids.detach().cpu().numpy().astype(np.int64))

        return hook

    def begin(self, prompt: int) -> None:
        """Before prompt `prompt`'s prefill: every layer's cursor to its start row."""
        self.policy.cursor = {m.index: self.starts[prompt] for m in self.view.layers}
        self.seen.append({m.index: [] for m in self.view.layers})

    def executed(self) -> list[dict[int, np.ndarray]]:
        """Per prompt, decoder layer -> the ids [T_p, K_m] the routers returned (prefill rows, then one per step)."""
        return [{i: np.concatenate(calls) for i, calls in p.items()} for p in self.seen]

    def remove(self) -> None:
        for h in self._capture:
            h.remove()
        self.hooks.remove()


# --synthetic-routing NAME[=VALUE] (offload.py, serve.py): name -> a function(work folder, value) giving the source the
# routers follow (None: the model's own routers). `replay`: the demo model's held-out trace, recorded under --work on
# first use; `replay=TRACE`: any recorded trace (yours: how would your model's routing behave offloaded at this size).
ROUTING_SOURCES = {"own": None,
                   "replay": lambda work, value: ReplaySource(Path(value) if value else demo_trace(work))}


def routing_source(spec: str) -> str:
    """argparse type of --synthetic-routing: the spec, checked (a trace folder must hold a trace)."""
    name, eq, value = spec.partition("=")
    if name not in ROUTING_SOURCES or (eq and name != "replay"):
        raise argparse.ArgumentTypeError(f"{spec!r}: known: own, replay (the demo model's held-out trace), "
                                         f"replay=TRACE (a trace folder written by `moekit trace`)")
    if eq and not (Path(value) / "manifest.json").is_file():
        raise argparse.ArgumentTypeError(f"{spec!r}: no trace at {value} (record one with `moekit trace MODEL --data "
                                         f"... --out DIR`)")
    return spec


def open_source(spec: str, work: Path) -> ReplaySource | None:
    """The source of a checked --synthetic-routing spec (None: the model's own routers)."""
    name, _, value = spec.partition("=")
    return ROUTING_SOURCES[name](work, value) if ROUTING_SOURCES[name] else None
