"""Ragged attention: many sequences of different lengths through one forward, each with its own KV cache.

Continuous batching packs the step's tokens of every active sequence into one row ([1, T] input ids, per-sequence
position ids), so every linear layer and every MoE layer sees all of them at once: an expert read for the step serves
every token routed to it. Only attention must keep the sequences apart. It is registered through transformers' public
attention interface (`AttentionInterface.register` + `model.set_attn_implementation`), the same hook transformers'
own paged attention uses; the model is called without a transformers cache, and this function keeps each sequence's
keys and values itself (`SequenceKV`) and calls the model's original attention function once per sequence, with that
sequence's queries and its whole cache. A sequence alone therefore goes through exactly the calls `generate` makes
(sdpa, no mask, `is_causal` on the prompt; no mask on a decode step), and its attention does not depend on the rest of
the batch. What does depend on the batch is the row count of the dense and expert matrix products, which can change
float rounding in the last bits (any batching server has this; tests/serve check the tokens stay equal).

Dimension legend: T packed tokens of the step, n one sequence's new tokens, L its cached length (new ones included),
h query heads, g key/value heads, d head dim.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

import torch

IMPLEMENTATION = "moekit_ragged"
_STEP = threading.local()  # the step being computed on this thread (set by `step_context`)


class SequenceKV:
    """One sequence's keys and values per attention layer, in buffers that grow by doubling up to `capacity` tokens
    (the tokens the scheduler reserved for it: prompt + max_tokens), so memory follows the tokens actually held."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: dict[int, torch.Tensor] = {}  # layer -> [1, g, cap, d]
        self.values: dict[int, torch.Tensor] = {}
        self.length: dict[int, int] = {}

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this step's k, v [1, g, n, d]; return the layer's whole cache [1, g, L, d] (views, no copy)."""
        n, old = k.shape[2], self.length.get(layer, 0)
        new = old + n
        buf_k = self.keys.get(layer)
        if buf_k is None or buf_k.shape[2] < new:
            cap = min(max(new, 2 * (0 if buf_k is None else buf_k.shape[2]), 16), max(self.capacity, new))
            self.keys[layer] = self._grown(buf_k, k, cap, old)
            self.values[layer] = self._grown(self.values.get(layer), v, cap, old)
        self.keys[layer][:, :, old:new] = k
        self.values[layer][:, :, old:new] = v
        self.length[layer] = new
        return self.keys[layer][:, :, :new], self.values[layer][:, :, :new]

    @staticmethod
    def _grown(buf, like: torch.Tensor, cap: int, keep: int) -> torch.Tensor:
        out = like.new_empty((*like.shape[:2], cap, like.shape[3]))
        if buf is not None and keep:
            out[:, :, :keep] = buf[:, :, :keep]
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.keys.values(), *self.values.values()])


@dataclass
class Segment:
    kv: SequenceKV
    start: int  # first packed position of this sequence's new tokens
    length: int  # its new tokens this step (n)
    past: int  # tokens already cached before this step


class step_context:
    """`with step_context(segments): model(...)`: the packed layout the attention function reads on this thread."""

    def __init__(self, segments: list[Segment]):
        self.segments = segments

    def __enter__(self):
        _STEP.segments = self.segments
        return self

    def __exit__(self, *exc):
        _STEP.segments = None


def _base_function(module, name: str):
    """The model's own attention function: a registered one (sdpa, flash, ...), or its modeling file's eager one."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    return sys.modules[type(module).__module__].eager_attention_forward


def _mask(seg: Segment, window: int | None, dtype, device, allow_none: bool):
    """Additive mask [1, 1, n, L] for this sequence's queries (causal, sliding window when the layer has one), or
    None where the base function needs none: a decode step inside the window, or (sdpa) a whole prompt, where sdpa's
    is_causal is what `generate` uses."""
    n, total = seg.length, seg.past + seg.length
    if window is None or total <= window:
        if n == 1 or (allow_none and seg.past == 0):
            return None
    q = torch.arange(seg.past, total, device=device)[:, None]  # [n, 1] absolute query positions
    k = torch.arange(total, device=device)[None, :]  # [1, L]
    keep = k <= q
    if window is not None:
        keep &= q - k < window  # transformers' sliding_window_overlay: q_idx - kv_idx < sliding_window
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, torch.finfo(dtype).min)[None, None]


def ragged_attention(module, query, key, value, attention_mask, **kwargs):
    """query [1, h, T, d], key/value [1, g, T, d]: the step's packed new tokens. Returns [1, T, h, d] (as every
    transformers attention function) and no weights."""
    segments = getattr(_STEP, "segments", None)
    if segments is None:  # transformers built no mask for this implementation: a plain call would be wrong
        raise RuntimeError(f"{IMPLEMENTATION}: called outside the serving engine's step; the model belongs to a "
                           f"moekit.serve Engine now")
    base_name = module.config._moekit_base_attention
    base = _base_function(module, base_name)
    window = kwargs.get("sliding_window") or None
    kwargs.pop("is_causal", None)
    outs = []
    for seg in segments:
        a, b = seg.start, seg.start + seg.length
        k, v = seg.kv.append(module.layer_idx, key[:, :, a:b], value[:, :, a:b])  # [1, g, L, d]
        mask = _mask(seg, window, query.dtype, query.device, allow_none=base_name == "sdpa")
        out, _ = base(module, query[:, :, a:b], k, v, mask, **kwargs)  # [1, n, h, d]
        outs.append(out)
    return torch.cat(outs, dim=1), None


def install(model) -> bool:
    """Route `model`'s attention through `ragged_attention` (its original implementation is called per sequence) if
    every decoder layer mixes tokens through transformers' attention interface, which a two-token probe forward
    checks; otherwise (linear attention, Mamba, convolution layers, attention with its own indexer cache: their state
    is not attention KV) leave the model as it was and return False: its sequences are then computed one at a time."""
    from transformers import AttentionInterface

    if IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPLEMENTATION, ragged_attention)
    base = model.config._attn_implementation
    if base == IMPLEMENTATION:
        return True
    for config in {id(c): c for c in _configs(model)}.values():
        config._moekit_base_attention = base
    model.set_attn_implementation(IMPLEMENTATION)
    if _probe(model):
        return True
    model.set_attn_implementation(base)
    return False


def _probe(model) -> bool:
    kv = SequenceKV(2)
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    try:
        with step_context([Segment(kv, 0, 2, 0)]), torch.no_grad():
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device),
                  position_ids=torch.arange(2, device=device)[None], use_cache=False, logits_to_keep=1)
    except (RuntimeError, TypeError, AttributeError, ValueError, IndexError):  # a layer that needs its own cache
        return False
    return len(kv.keys) == model.config.get_text_config().num_hidden_layers


def _configs(model):
    """The config objects attention modules read (the top config and, for composite models, the text config)."""
    yield model.config
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m, "layer_idx"):
            yield m.config
