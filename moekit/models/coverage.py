"""Which transformers configs have routed experts, and moekit's verdict on each: supported (a registered adapter or
multimodal wrapper) or excluded, with the reason. tests/models/test_coverage.py enumerates transformers' config
registry through `uncovered()`, so the `make lock` that brings in a transformers with a new MoE family fails the suite
and names the family to add.

Detection, two ways, either one suffices:
  - a config (or any of its sub-configs) whose default values name experts (num_experts, n_routed_experts,
    num_local_experts, moe_num_experts, expert_capacity, ...);
  - a modeling module defining an experts or router class (`@use_experts_implementation`, `class ...Experts(`,
    `class ...Router(`): at least one of its config types must then be covered, which catches a new family whose
    config spells its expert count some other way.
Only configs whose module mentions experts at all are instantiated, which keeps the scan to about a second.
"""

from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path

EXCLUDED: dict[str, str] = {
    # not language models: vision or token-classification backbones with expert layers
    "vitpose": "pose estimation (vision): ViTPose+ expert heads, not a language model",
    "vitpose_backbone": "pose estimation (vision): ViTPose+ backbone with expert MLPs, not a language model",
    "dots3_note_vision_encoder": "the vision tower of Dots3-Note; moekit covers its language model (dots3_note)",
    "openai_privacy_filter": "a token-classification encoder (PII tagging), not a generative language model",
    "granite_docling": "no routed experts: its DensityRouter only decides whether an image takes the fine connector "
                       "path (matched by the router-class check)",
    "qwen3_omni_moe_talker_text": "the talker of Qwen3-Omni (speech-code decoder inside qwen3_omni_moe); moekit "
                                  "covers the thinker's language model",
    # MoE language models moekit does not cover yet
    "dbrx": "not yet supported: experts stored as flat [E x I, H] matrices (w1, v1, w2) and routed inline by the "
            "FFN with an Lp-norm renormalisation, its MoE keys in ffn_config",
    "gemma4_text": "not yet supported: its MoE sits inside the decoder layer next to a dense MLP, the router reads the "
                   "residual stream through its own norm and scales while the experts read a differently normed "
                   "copy, so no module is the MoE block the view hooks (MoE only when enable_moe_block)",
    "gemma4": "not yet supported: the Gemma 4 wrapper of gemma4_text (see there)",
    "gemma4_assistant": "not yet supported: Gemma 4's assistant draft model (gemma4_text layers; its default config "
                        "does not even build in transformers 5.24)",
    "diffusion_gemma_text": "a block-diffusion language model on gemma4_text layers (not autoregressive; see "
                            "gemma4_text)",
    "diffusion_gemma": "the block-diffusion wrapper of diffusion_gemma_text (see there)",
}

_EXPERT_CLASS = re.compile(r"@use_experts_implementation|^class \w*(Experts|ExpertGLU|Router|TopkRouter|TopKRouter)\(",
                           re.M)


def covered(model_type: str) -> str | None:
    """'supported', 'wrapper', 'excluded: <reason>', or None when moekit has no verdict on this config."""
    from moekit.models.architecture import wrappers
    from moekit.models.registry import supported

    if model_type in supported():
        return "supported"
    if model_type in wrappers():
        return "wrapper"
    if model_type in EXCLUDED:
        return f"excluded: {EXCLUDED[model_type]}"
    return None


def uncovered() -> dict[str, str]:
    """model_type -> why it counts as an MoE config, for every routed-expert config moekit has no verdict on."""
    found = {t: f"its config declares experts ({keys[0]})" for t, keys in routed_expert_configs().items()}
    for module, types in moe_modules().items():
        if not any(covered(t) for t in types):
            found.setdefault(types[0], f"modeling_{module}.py defines an experts or router class")
    return {t: why for t, why in sorted(found.items()) if covered(t) is None}


@functools.cache
def routed_expert_configs() -> dict[str, list[str]]:
    """model_type -> the expert-naming keys of its default config (sub-configs included); computed once."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    out = {}
    for model_type, module in _model_modules().items():
        if not _mentions_experts(module):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = CONFIG_MAPPING[model_type]()
        except Exception:  # noqa: BLE001  a default that does not build (gemma4_assistant): the module check covers it
            continue
        keys = expert_keys(config.to_dict())
        if keys:
            out[model_type] = keys
    return out


def expert_keys(d: dict, prefix: str = "") -> list[str]:
    """Keys of a config dict (nested sub-configs included) that name experts."""
    keys = []
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            keys += expert_keys(v, name + ".")
        elif "expert" in str(k).lower():
            keys.append(name)
    return keys


def moe_modules() -> dict[str, list[str]]:
    """modeling module -> its config types, for the modules that define an experts or router class."""
    by_module: dict[str, list[str]] = {}
    for model_type, module in _model_modules().items():
        by_module.setdefault(module, []).append(model_type)
    return {m: types for m, types in by_module.items() if _EXPERT_CLASS.search(_source(m, "modeling"))}


@functools.cache
def _model_modules() -> dict[str, str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    return {t: model_type_to_module_name(t) for t in sorted(CONFIG_MAPPING_NAMES)}


@functools.cache
def _source(module: str, kind: str) -> str:
    import transformers

    path = Path(transformers.__file__).parent / "models" / module / f"{kind}_{module}.py"
    return path.read_text() if path.is_file() else ""


def _mentions_experts(module: str) -> bool:
    return any("expert" in _source(module, kind).lower() for kind in ("configuration", "modeling", "modular"))
