"""Hardware profiles for the simulator's throughput bound: bandwidth of the slow tier (where missed experts come from),
of the fast tier (where resident experts are read during compute), and compute throughput.

Bound on decode tokens/s, assuming loads overlap compute perfectly (prefetch) and only routed experts cost anything:
  time/token >= max(missed bytes / slow_bw, active expert bytes / fast_bw, 2 * active expert params / compute)
The first term alone is the physical limit of docs/conventions.md §Physical bound (tokens/s <= slow-tier bandwidth /
missed bytes/token).
Numbers are nominal peaks from the datasheets and standards named in `source`; real systems reach 60-90% of them.
User profiles: a YAML file with the same keys (name, slow_tier, slow_gbs, fast_tier, fast_gbs, compute_tflops, source).
Expert-parallel profiles add the network between GPUs (`moekit place-eval`'s step-time model): intra_node_gbs (GB/s per
GPU and direction to a GPU of the same node, e.g. NVLink) and inter_node_gbs (per GPU and direction to other nodes,
e.g. one InfiniBand NIC per GPU); both optional, so older YAML files stay valid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from moekit.errors import UserError, describe


def _check_positive(profile: str, key: str, value, when: str = "") -> None:
    """A bandwidth or throughput: a finite number > 0 (YAML gives text, booleans, NaN and infinity as readily)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise UserError(f"hardware profile {profile!r}: {key} must be a number > 0{when}, got {value!r}")


@dataclass(frozen=True)
class Hardware:
    name: str
    slow_tier: str
    slow_gbs: float  # GB/s (1e9 bytes) the missed experts are read at
    fast_tier: str
    fast_gbs: float  # GB/s resident experts are read at during compute
    compute_tflops: float  # dense TFLOP/s in the model's dtype
    source: str = ""
    intra_node_gbs: float | None = None  # GB/s per GPU and direction to GPUs of its node (expert parallelism)
    inter_node_gbs: float | None = None  # GB/s per GPU and direction to other nodes

    def __post_init__(self):
        for key in ("name", "slow_tier", "fast_tier", "source"):
            if not isinstance(getattr(self, key), str):
                raise UserError(f"hardware profile {self.name!r}: {key} must be text, got {getattr(self, key)!r}")
        for key in ("slow_gbs", "fast_gbs", "compute_tflops"):
            _check_positive(self.name, key, getattr(self, key))
        for key in ("intra_node_gbs", "inter_node_gbs"):
            if getattr(self, key) is not None:
                _check_positive(self.name, key, getattr(self, key), " when given")

    def bound(self, missed_bytes: float, active_bytes: float, active_params: float) -> dict:
        """tokens/s bounds for per-token missed bytes, active expert bytes and active expert parameters."""
        terms = {"load": missed_bytes / (self.slow_gbs * 1e9), "memory": active_bytes / (self.fast_gbs * 1e9),
                 "compute": 2 * active_params / (self.compute_tflops * 1e12)}
        limit = max(terms, key=terms.get)
        inv = lambda s: float("inf") if s == 0 else 1.0 / s
        return {"load_bound_tok_s": inv(terms["load"]), "bound_tok_s": inv(terms[limit]), "limited_by": limit}

    def as_dict(self) -> dict:
        return asdict(self)


BUILTIN = {
    "pcie4-gpu": Hardware(
        "pcie4-gpu", "host RAM over PCIe 4.0 x16", 31.5, "A100-40GB HBM2", 1555.0, 312.0,
        "PCIe 4.0: 16 GT/s x 16 lanes, 128b/130b = 31.5 GB/s (PCI-SIG); NVIDIA A100 datasheet: 1,555 GB/s, "
        "312 TFLOP/s BF16 dense"),
    "pcie5-gpu": Hardware(
        "pcie5-gpu", "host RAM over PCIe 5.0 x16", 63.0, "H100-SXM HBM3", 3350.0, 989.0,
        "PCIe 5.0: 32 GT/s x 16 lanes, 128b/130b = 63 GB/s (PCI-SIG); NVIDIA H100 SXM datasheet: 3.35 TB/s, "
        "989 TFLOP/s BF16 dense"),
    "nvme-cpu": Hardware(
        "nvme-cpu", "NVMe SSD, PCIe 4.0 x4", 7.45, "DDR5-4800 dual channel", 76.8, 3.07,
        "Samsung 990 PRO datasheet: 7,450 MB/s sequential read; JEDEC DDR5-4800: 4800 MT/s x 8 B x 2 channels = "
        "76.8 GB/s; 16 cores x 3.0 GHz x 64 FP32 FLOP/cycle (2 AVX-512 FMA units) = 3.07 TFLOP/s"),
    "ddr5-cpu": Hardware(
        "ddr5-cpu", "DDR5-4800 dual channel", 76.8, "DDR5-4800 dual channel", 76.8, 3.07,
        "all experts in RAM, CPU compute: both tiers are DDR5 (JEDEC, 76.8 GB/s), so the bound is memory-bound "
        "decoding, the ceiling nvme-cpu approaches as its hit rate goes to 1; compute as nvme-cpu"),
    "dgx-a100": Hardware(
        "dgx-a100", "host RAM over PCIe 4.0 x16", 31.5, "A100-80GB SXM HBM2e", 2039.0, 312.0,
        "NVIDIA A100 datasheet: 2,039 GB/s, 312 TFLOP/s BF16 dense, NVLink 3 600 GB/s bidirectional = 300 GB/s per "
        "direction; DGX A100: one ConnectX-6 HDR 200 Gb/s NIC per GPU = 25 GB/s", 300.0, 25.0),
    "dgx-h100": Hardware(
        "dgx-h100", "host RAM over PCIe 5.0 x16", 63.0, "H100-SXM HBM3", 3350.0, 989.0,
        "NVIDIA H100 SXM datasheet: 3.35 TB/s, 989 TFLOP/s BF16 dense, NVLink 4 900 GB/s bidirectional = 450 GB/s "
        "per direction; DGX H100: one ConnectX-7 NDR 400 Gb/s NIC per GPU = 50 GB/s", 450.0, 50.0),
}


def load_profile(name_or_path: str) -> Hardware:
    """A built-in profile by name, or a YAML file."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise UserError(f"unknown hardware profile {name_or_path!r}: built-in {', '.join(BUILTIN)}, or a YAML file")
    import yaml

    keys = ("name, slow_tier, slow_gbs, fast_tier, fast_gbs, compute_tflops, source (+ intra_node_gbs, inter_node_gbs "
            "for expert parallelism)")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read hardware profile {path}: not UTF-8 YAML ({describe(err)}); write a mapping "
                        f"with the keys {keys}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UserError(f"hardware profile {path} is not a mapping of keys to values; keys: {keys}")
    unknown = sorted(set(data) - {f.name for f in fields(Hardware)})
    missing = sorted({"slow_tier", "slow_gbs", "fast_tier", "fast_gbs", "compute_tflops"} - set(data))
    if unknown or missing:
        raise UserError(f"hardware profile {path}: {'unknown keys ' + ', '.join(unknown) if unknown else ''}"
                        f"{'; ' if unknown and missing else ''}{'missing ' + ', '.join(missing) if missing else ''}; "
                        f"keys: {keys}")
    return Hardware(**{"name": path.stem, **data})
