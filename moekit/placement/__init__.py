"""Expert placement for expert parallelism: plans from routing traces that SGLang and vLLM load.

    moekit.placement.place(TRACE, OUT, Cluster(gpus=8, redundant=8), method="balanced-affinity")
    moekit.placement.place_eval(OUT, HELDOUT_TRACE, hardware="dgx-h100")

Methods (registered in moekit.placement.methods.METHODS): `eplb` (DeepSeek's EPLB, moekit/placement/eplb.py),
`exflow` (ExFlow's affinity program, arXiv 2401.08383), `balanced-affinity` (EPLB's balance with ExFlow's affinity).
Outputs and formats: moekit/placement/files.py and docs/placement.md.
"""

from moekit.placement.api import Cluster, place, place_eval
from moekit.placement.methods import METHODS, PlanOptions
from moekit.placement.plan import Plan, Topology

__all__ = ["METHODS", "Cluster", "Plan", "PlanOptions", "Topology", "place", "place_eval"]
