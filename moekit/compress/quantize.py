"""Mixed-precision expert quantisation (docs/quantization.md): group-wise round-to-nearest at 2/3/4/8 bits per expert,
with bit widths chosen uniformly (`rtn`) or by MC-MoE's pre-loading mixed-precision quantisation (`pmq`).

Quantiser: asymmetric round-to-nearest with one scale and one integer zero point per group of `group_size` consecutive
weights along the input dimension (the last dim of the canonical [out, in] matrices gate/up [I, H] and down [H, I]).
The range of each group is widened to include 0 and the zero point is an integer in [0, 2^b - 1], as in GPTQ's
`Quantizer` (arXiv 2210.17323, github IST-DASLab/gptq); scales are stored in float16 and the quantiser uses the
float16-rounded scale, so dequantising the stored codes gives exactly the weights the in-memory model was run with.
Only the routed experts' weight matrices are quantised; expert biases, routers, attention, shared experts stay dense.

PMQ (Huang et al., "Mixture Compressor for MoE LLMs Gains More", arXiv 2410.06270, github Aaronhuang-778/MC-MoE):
per layer, n_e = activation count, w_e = summed routing weight (both normalised over the layer's experts),
L_{e,b} = ||Z - Z_{e@b}||_F with only expert e at b bits, computed only on the tokens routed to e:
Z_{e@b} - Z = w_{t,e} (E_e^b(x_t) - E_e(x_t)). An integer LP picks one width per expert:
  min sum_e sum_b x_{e,b} n_e^alpha w_e^beta L_{e,b}^alpha  s.t.  sum_b x_{e,b} = 1,  sum_e sum_b b x_{e,b} <= B E,
alpha = 1, beta = 1.5, solved with HiGHS (scipy.optimize.milp). Deviation: the paper's L sums the Frobenius norm over
calibration batches; we take one norm over all calibration tokens of the layer (a single batch). Z is recomputed with
the reference expert loop rather than taken from the captured block outputs (they agree to float32 rounding).

On disk: the dequantised weights in the normal fused layout and model dtype (plain `from_pretrained` loads them and
gives exactly the quantised model's logits, with no memory saving), plus a `quantized/` sidecar with the packed codes,
scales and zero points that is what a quantised runtime would hold (docs/quantization.md).

Dimension legend: T tokens, E experts, K selected per token, H hidden, I intermediate, R rows, C columns, N groups.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moekit.compress.calib import Calibration
from moekit.errors import UserError
from moekit.models.view import MoELayer, MoEView
from moekit.ops.reference import expert_mlp
from moekit.ops.routing import route

BITS = (2, 3, 4, 8)  # widths the quantiser supports
DENSE = 16  # "16 bits": the expert is left as it is (pass-through)
SCHEMA_VERSION = 1
SIDECAR = "quantized"
MATRICES = ("gate", "up", "down")

# ---------------------------------------------------------------- the quantiser


@dataclass
class QuantizedMatrix:
    codes: torch.Tensor  # [R, N * group] uint8, columns padded to whole groups
    scale: torch.Tensor  # [R, N] float16
    zero: torch.Tensor  # [R, N] uint8
    bits: int
    shape: tuple[int, int]  # (R, C) before padding

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scale.shape[1]

    def packed_bytes(self) -> int:
        return math.ceil(self.codes.numel() * self.bits / 8) + self.scale.numel() * 2 + self.zero.numel()


def quantize_matrix(w: torch.Tensor, bits: int, group_size: int) -> QuantizedMatrix:
    """Asymmetric group-wise round-to-nearest of w [R, C] (GPTQ's `Quantizer`, arXiv 2210.17323)."""
    if bits not in BITS:
        raise ValueError(f"unsupported width {bits}; supported: {BITS}")
    r, c = w.shape
    n = -(-c // group_size)
    wg = torch.nn.functional.pad(w.float(), (0, n * group_size - c)).view(r, n, group_size)  # [R, N, g]
    maxq = 2**bits - 1
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)  # [R, N], range includes 0
    scale = ((hi - lo) / maxq).clamp(min=2**-14).half()  # float16-rounded, the value dequantisation uses
    s = scale.float()
    zero = torch.round(-lo / s).clamp(0, maxq)  # [R, N]
    codes = (torch.round(wg / s[..., None]) + zero[..., None]).clamp(0, maxq)  # [R, N, g]
    return QuantizedMatrix(codes.to(torch.uint8).view(r, n * group_size), scale, zero.to(torch.uint8), bits, (r, c))


def dequantize_matrix(q: QuantizedMatrix, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes - zero) * scale in float32, cut to the original columns, then cast -> [R, C]."""
    r, c = q.shape
    n, g = q.scale.shape[1], q.group_size
    w = (q.codes.view(r, n, g).float() - q.zero.float()[..., None]) * q.scale.float()[..., None]  # [R, N, g]
    return w.view(r, n * g)[:, :c].to(dtype)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """b-bit codes (uint8, any shape) -> a dense little-bit-stream of ceil(numel * b / 8) bytes (uint8 [M])."""
    flat = codes.reshape(-1).numpy().astype(np.uint8)
    bit_planes = np.unpackbits(flat[:, None], axis=1, bitorder="little")[:, :bits]  # [numel, b]
    return torch.from_numpy(np.packbits(bit_planes.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack_codes -> uint8 [numel]. Widths dividing 8 take a shift-and-mask path (the offloaded runtime
    unpacks every low-bit miss: ~20x faster than the bit-plane route, which 3 bits still take)."""
    if 8 % bits == 0:  # little bit order: code i sits at bits (i % per) * b .. of byte i // per
        per = 8 // bits
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)  # [per]
        codes = (packed[:, None] >> shifts) & (2**bits - 1)  # [M, per]
        return codes.reshape(-1)[:numel]
    stream = np.unpackbits(packed.numpy(), bitorder="little")[: numel * bits].reshape(numel, bits)
    bit_planes = np.pad(stream, ((0, 0), (0, 8 - bits)))  # [numel, 8]
    return torch.from_numpy(np.packbits(bit_planes, axis=1, bitorder="little").reshape(-1))


def quantize_expert(w: dict[str, torch.Tensor], bits: int, group_size: int) -> dict[str, QuantizedMatrix]:
    return {k: quantize_matrix(w[k], bits, group_size) for k in MATRICES if k in w}


def dequantize_expert(w: dict[str, torch.Tensor], q: dict[str, QuantizedMatrix]) -> dict[str, torch.Tensor]:
    """Expert weights with its matrices replaced by their dequantised codes, in the dtype of w (biases unchanged)."""
    return {k: (dequantize_matrix(q[k], v.dtype) if k in q else v) for k, v in w.items()}


# ---------------------------------------------------------------- PMQ: statistics, losses, the integer program


def routing_stats(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n [E] normalised activation counts, w [E] normalised summed routing weights, weights [T, K], ids [T, K])."""
    with torch.no_grad():
        weights, ids = route(layer.router_logits(x), layer.rule, layer.correction_bias)  # [T, K]
    e = layer.num_experts
    slots = e + getattr(layer, "identity_experts", 0)  # LongCat-Flash zero experts: routed to, never quantised
    n = torch.bincount(ids.reshape(-1), minlength=slots).double()[:e]
    w = torch.zeros(slots, dtype=torch.float64).index_add_(0, ids.reshape(-1), weights.reshape(-1).double())[:e]
    return n / n.sum().clamp_min(1e-12), w / w.sum().clamp_min(1e-12), weights, ids


def expert_losses(layer: MoELayer, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, e: int,
                  bits: tuple[int, ...], group_size: int) -> list[float]:
    """L_{e,b} = ||Z - Z_{e@b}||_F for each width b: only the tokens routed to e change, by
    w_{t,e} (E_e^b(x_t) - E_e(x_t)) (arXiv 2410.06270 §3.2; Llama 4 weights the input instead)."""
    tok, slot = torch.where(ids == e)
    if tok.numel() == 0:
        return [0.0] * len(bits)
    g = weights[tok, slot, None].to(x.dtype)  # [t, 1]
    if layer.adapter.expert_in:  # experts in a latent space: their projected input (losses in that space)
        x = layer.expert_input(x.to(layer.expert_params()[0].dtype)).float()
    xe = x[tok] * g if layer.rule.weight_on_input else x[tok]  # [t, H]
    scale = 1.0 if layer.rule.weight_on_input else g
    w = layer.get_expert(e)
    with torch.no_grad():
        y = expert_mlp(xe, {k: v.float() for k, v in w.items()}, layer.activation, layer.expert_norm)  # [t, H]
        out = []
        for b in bits:
            wb = dequantize_expert({k: v.float() for k, v in w.items()}, quantize_expert(w, b, group_size))
            out.append(((expert_mlp(xe, wb, layer.activation, layer.expert_norm) - y) * scale).double().norm().item())
    return out


def solve_bits(cost: np.ndarray, bits: tuple[int, ...], avg_bits: float) -> list[int]:
    """The PMQ integer program (arXiv 2410.06270 Eq. 6): cost [E, B] -> one width per expert minimising the summed cost
    with mean width <= avg_bits. HiGHS via scipy.optimize.milp."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    e, nb = cost.shape
    if avg_bits < min(bits):
        raise UserError(f"--avg-bits {avg_bits:g} is below the smallest width {min(bits)}")
    one_each = np.kron(np.eye(e), np.ones(nb))  # [E, E*B]: sum_b x_{e,b} = 1
    budget = np.tile(np.asarray(bits, dtype=float), e)[None]  # [1, E*B]: sum b x_{e,b} <= B E
    res = milp(cost.reshape(-1), integrality=np.ones(e * nb), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(budget, -np.inf, avg_bits * e + 1e-9)],
               options={"mip_rel_gap": 0.0})
    if not res.success:
        raise RuntimeError(f"PMQ integer program failed: {res.message}")
    choice = np.round(res.x).reshape(e, nb).argmax(1)  # [E] index into bits
    return [bits[int(j)] for j in _spend_leftover(cost, bits, choice, avg_bits * e)]


def _spend_leftover(cost: np.ndarray, bits: tuple[int, ...], choice: np.ndarray, budget: float) -> np.ndarray:
    """Raise widths that cost nothing more (experts no calibration token reached have cost 0 at every width) while the
    budget allows: the objective stays optimal and the bits are not left unused."""
    choice = choice.copy()
    for e in np.argsort(-cost.sum(1), kind="stable"):
        for j in range(len(bits) - 1, choice[e], -1):
            spare = budget - sum(bits[int(c)] for c in choice)
            if cost[e, j] <= cost[e, choice[e]] and bits[j] - bits[choice[e]] <= spare + 1e-9:
                choice[e] = j
                break
    return choice


def pmq_cost(n: torch.Tensor, w: torch.Tensor, losses: np.ndarray, alpha: float = 1.0, beta: float = 1.5) -> np.ndarray:
    """(n_e^alpha w_e^beta) L_{e,b}^alpha -> [E, B] (arXiv 2410.06270 Eq. 5-6, alpha = 1, beta = 1.5)."""
    importance = (n.numpy() ** alpha) * (w.numpy() ** beta)  # [E]
    return importance[:, None] * losses**alpha


# ---------------------------------------------------------------- plans: decoder layer -> width per expert


def check_bits(avg_bits: float, method: str) -> None:
    """--avg-bits against --method, before any weight is read: rtn takes one of BITS, pmq any budget >= the smallest
    width; 16 and more keep the experts as they are."""
    if method not in ("rtn", "pmq"):
        raise UserError(f"unknown --method {method!r}; known: rtn, pmq")
    if not math.isfinite(avg_bits):
        raise UserError(f"--avg-bits must be a number of bits such as 4 or 2.5, got {avg_bits}")
    if avg_bits >= DENSE:
        return
    if method == "rtn" and (avg_bits not in BITS or int(avg_bits) != avg_bits):
        raise UserError(f"--method rtn needs --avg-bits in {', '.join(map(str, (*BITS, DENSE)))}, got {avg_bits:g} "
                        f"(other budgets, e.g. 2.5, need --method pmq)")
    if avg_bits < min(BITS):
        raise UserError(f"--avg-bits {avg_bits:g} is below the smallest width {min(BITS)}")


def rtn_plan(view: MoEView, bits: float) -> dict[int, list[int]]:
    """Every expert at `bits` (one of BITS, or 16: pass-through)."""
    check_bits(bits, "rtn")
    return {m.index: [int(bits)] * m.num_experts for m in view.layers}


def pmq_plan(view: MoEView, cal: Calibration, avg_bits: float, group_size: int, *, bits: tuple[int, ...] = BITS,
             alpha: float = 1.0, beta: float = 1.5, progress: Callable | None = None) -> tuple[dict, dict]:
    """PMQ widths per layer, and the per-layer losses L [E, B] and importances it used (for the report)."""
    plan, details = {}, {}
    for layer in view.layers:
        x = cal.x[layer.index].float()  # [T, H]; losses in float32 whatever the model dtype
        n, w, weights, ids = routing_stats(layer, x.to(layer.expert_params()[0].dtype))  # route as the model does
        losses = []
        for e in range(layer.num_experts):
            losses.append(expert_losses(layer, x, weights, ids, e, bits, group_size))
            if progress is not None:
                progress()
        losses = np.asarray(losses)  # [E, B]
        plan[layer.index] = solve_bits(pmq_cost(n, w, losses, alpha, beta), bits, avg_bits)
        details[layer.index] = {"n": n.tolist(), "w": w.tolist(), "loss": losses.tolist()}
    return plan, details


# ---------------------------------------------------------------- applying a plan; the sidecar; loading it back


def apply_plan(view: MoEView, plan: dict[int, list[int]], group_size: int,
               progress: Callable | None = None) -> dict[str, torch.Tensor]:
    """Quantise every expert to its width in place (dequantised weights in the model dtype) and return the sidecar
    tensors: `layers.{L}.experts.{e}.{gate|up|down}.{codes|scale|zero}` (codes bit-packed)."""
    sidecar = {}
    for layer in view.layers:
        for e, b in enumerate(plan[layer.index]):
            if b != DENSE:
                w = layer.get_expert(e)
                q = quantize_expert(w, b, group_size)
                layer.set_expert(e, dequantize_expert(w, q))
                for k, qm in q.items():
                    key = f"layers.{layer.index}.experts.{e}.{k}"
                    sidecar[f"{key}.codes"] = pack_codes(qm.codes, b)
                    sidecar[f"{key}.scale"], sidecar[f"{key}.zero"] = qm.scale, qm.zero
            if progress is not None:
                progress()
    return sidecar


def sidecar_config(view: MoEView, plan: dict[int, list[int]], group_size: int, method: str) -> dict:
    shapes = {k: list(v.shape) for k, v in view.layers[0].get_expert(0).items() if k in MATRICES}
    return {
        "schema_version": SCHEMA_VERSION,
        "format": "moekit-groupwise-asymmetric-rtn",
        "method": method,
        "group_size": group_size,
        "group_axis": "input (last dim of canonical gate/up [I, H] and down [H, I])",
        "codes": "uint8 bit-stream, little-endian bit order, ceil(rows * padded_cols * bits / 8) bytes",
        "scale_dtype": "float16",
        "zero_dtype": "uint8",
        "dequantize": "w = (code - zero) * float32(scale), cast to the model dtype; columns padded to whole groups",
        "dense_width": DENSE,
        "model_dtype": str(view.layers[0].expert_params()[0].dtype).replace("torch.", ""),
        "shapes": shapes,
        "bits": {str(k): v for k, v in plan.items()},
    }


def write_sidecar(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    from safetensors.torch import save_file

    (folder / SIDECAR).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / SIDECAR / "experts.safetensors"))
    (folder / SIDECAR / "quantization.json").write_text(json.dumps(config, indent=2) + "\n")


def load_quantized(path: Path, dtype: torch.dtype | None = None):
    """A quantised checkpoint -> its model, with every quantised expert rebuilt from the packed sidecar (not from the
    dense copy). Same logits as plain from_pretrained on the folder; a runtime holding only the sidecar saves bytes."""
    from safetensors import safe_open

    import moekit.models

    path = Path(path)
    config_file = path / SIDECAR / "quantization.json"
    if not config_file.is_file():
        raise UserError(f"{path} has no {SIDECAR}/quantization.json: not a moekit-quantised checkpoint")
    config = json.loads(config_file.read_text())
    if config.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{config_file}: schema version {config.get('schema_version')}, this moekit reads "
                        f"{SCHEMA_VERSION}")
    view = moekit.models.load(path, dtype=dtype)
    with safe_open(str(path / SIDECAR / "experts.safetensors"), framework="pt") as f:
        for layer in view.layers:
            for e, b in enumerate(config["bits"][str(layer.index)]):
                if b != DENSE:
                    w = layer.get_expert(e)
                    q = {k: _read_matrix(f, f"layers.{layer.index}.experts.{e}.{k}", b, config["shapes"][k],
                                         config["group_size"])
                         for k in MATRICES if k in w}
                    layer.set_expert(e, dequantize_expert(w, q))
    return view.model.eval()


def _read_matrix(f, key: str, bits: int, shape: list[int], group_size: int) -> QuantizedMatrix:
    scale, zero = f.get_tensor(f"{key}.scale"), f.get_tensor(f"{key}.zero")  # [R, N]
    r, n = scale.shape
    codes = unpack_codes(f.get_tensor(f"{key}.codes"), bits, r * n * group_size).view(r, n * group_size)
    return QuantizedMatrix(codes, scale, zero, bits, tuple(shape))


# ---------------------------------------------------------------- bytes


def packed_bytes(view: MoEView, plan: dict[int, list[int]], group_size: int) -> dict[str, int]:
    """Bytes a quantised runtime holds (packed experts + everything else dense) vs the dense checkpoint."""
    dense = sum(p.numel() * p.element_size() for p in view.model.parameters())
    layer = view.layers[0]
    size = layer.expert_params()[0].element_size()
    packed = dense
    for m in view.layers:
        w = m.get_expert(0)
        for b in plan[m.index]:
            if b != DENSE:
                for k in MATRICES:
                    if k in w:
                        r, c = w[k].shape
                        n = -(-c // group_size)
                        packed += math.ceil(r * n * group_size * b / 8) + r * n * 3 - w[k].numel() * size
    return {"dense_bytes": dense, "packed_bytes": packed}


def check_group_size(group_size: int) -> None:
    if group_size < 1 or group_size % 8:
        raise UserError(f"--group-size must be a positive multiple of 8 (64 or 128 recommended), got {group_size}")


# ---------------------------------------------------------------- the whole step


@dataclass
class Quantized:
    report: dict  # compression.json
    sidecar: dict[str, torch.Tensor]  # packed tensors
    config: dict  # quantized/quantization.json

    def write(self, folder: Path) -> None:
        write_sidecar(folder, self.sidecar, self.config)


def quantize(view: MoEView, avg_bits: float, *, method: str = "rtn", group_size: int = 128,
             cal: Calibration | None = None, progress: Callable | None = None) -> Quantized:
    """Choose widths (rtn: all `avg_bits`; pmq: the integer program; 16: pass-through), quantise in place, and return
    the report and the sidecar to write with the checkpoint."""
    check_group_size(group_size)
    check_bits(avg_bits, method)
    view.require("quantize", causal=True, routing=method == "pmq" and avg_bits < DENSE)
    details = None
    if avg_bits >= DENSE:
        plan = rtn_plan(view, DENSE)  # nothing to choose: every expert stays as it is
    elif method == "rtn":
        plan = rtn_plan(view, avg_bits)
    else:  # pmq (check_bits knows no other)
        if cal is None:
            raise UserError("--method pmq needs calibration data: pass --calib DATA")
        plan, details = pmq_plan(view, cal, avg_bits, group_size, progress=progress)
    bytes_ = packed_bytes(view, plan, group_size)
    sidecar = apply_plan(view, plan, group_size)
    widths = [b for bs in plan.values() for b in bs]
    report = {
        "method": f"quantize-{method}",
        "paper": "arXiv 2410.06270 (PMQ)" if method == "pmq" else "group-wise RTN (GPTQ quantiser, arXiv 2210.17323)",
        "avg_bits_budget": avg_bits,
        "avg_bits_achieved": sum(widths) / len(widths),
        "group_size": group_size,
        "bits_per_layer": {str(k): v for k, v in plan.items()},
        **bytes_,
        "note": "dense safetensors hold the DEQUANTISED weights (plain from_pretrained: same logits, no memory saving); "
                "quantized/ holds the packed codes that packed_bytes counts",
    }
    if details is not None:
        report["pmq"] = {"alpha": 1.0, "beta": 1.5, "widths": list(BITS), "calibration_tokens": cal.tokens,
                         "per_layer": {str(k): v for k, v in details.items()}}
    return Quantized(report, sidecar, sidecar_config(view, plan, group_size, method))
