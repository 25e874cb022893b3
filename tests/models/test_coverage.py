"""Every config in transformers' registry that has routed experts is supported by moekit or excluded with a reason, so a
lock refresh that brings a new MoE family fails here, naming it (moekit/models/coverage.py)."""

from __future__ import annotations

from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

import moekit.models
from moekit.models import coverage
from moekit.models.architecture import wrappers


def test_every_routed_expert_config_is_supported_or_excluded_with_a_reason():
    missing = coverage.uncovered()
    listed = "; ".join(f"{t}: {why}" for t, why in missing.items())
    assert not missing, f"MoE configs moekit neither supports nor excludes (add an adapter, a wrapper or an EXCLUDED " \
                        f"reason in moekit/models/coverage.py): {listed}"


def test_the_detector_finds_moe_configs_and_only_those():
    found = coverage.routed_expert_configs()
    for moe in ("mixtral", "deepseek_v3", "llama4", "qwen3_vl_moe", "switch_transformers", "nllb-moe", "dbrx", "doge"):
        assert moe in found, moe
    for dense in ("llama", "qwen2", "gpt2", "t5", "bert"):
        assert dense not in found, dense
    assert "n_routed_experts" in found["deepseek_v3"] and "text_config.num_local_experts" in found["llama4"]


def test_a_new_moe_family_is_reported(monkeypatch):
    """What the next transformers brings: a config naming its experts, and a module with an experts class whose
    config does not (the two ways a family is detected)."""
    real = coverage.routed_expert_configs()
    monkeypatch.setattr(coverage, "routed_expert_configs", lambda: {**real, "newmoe": ["num_experts"]})
    modules = coverage.moe_modules()
    monkeypatch.setattr(coverage, "moe_modules", lambda: {**modules, "oddmoe": ["oddmoe"]})
    assert coverage.uncovered() == {"newmoe": "its config declares experts (num_experts)",
                                    "oddmoe": "modeling_oddmoe.py defines an experts or router class"}


def test_exclusions_are_real_configs_with_reasons_and_not_also_supported():
    supported = set(moekit.models.supported()) | set(wrappers())
    for model_type, reason in coverage.EXCLUDED.items():
        assert model_type in CONFIG_MAPPING_NAMES, f"stale exclusion {model_type}"
        assert model_type not in supported and len(reason) > 20
    assert all(t in CONFIG_MAPPING_NAMES for t in supported), "every adapter and wrapper is a transformers config"
