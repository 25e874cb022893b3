"""The MoE view: `load(path_or_model)` -> MoEView. Adapters are registered in moekit/models/families*.py."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moekit.errors import UserError, describe
from moekit.models import families, families_sigmoid, families_softmax  # noqa: F401  (registers the adapters)
from moekit.models import validate
from moekit.models.registry import Adapter, ExpertLayout, get, register, supported
from moekit.models.view import MoELayer, MoEView
from moekit.ops.activations import glu


def load(model_or_path, *, dtype: torch.dtype | str | None = None, meta: bool = False) -> MoEView:
    """A view of a transformers MoE causal LM, given the model or a checkpoint folder.

    meta=True builds the model on the meta device from its config (no weights read): enough for shapes and counts.
    """
    if isinstance(model_or_path, nn.Module):
        return view(model_or_path)
    return view(_load_model(Path(model_or_path), dtype=dtype, meta=meta))


def load_config(path: Path):
    """The config of the checkpoint folder `path`, after its files are checked (validate.check_folder)."""
    from transformers import AutoConfig

    validate.check_folder(path)  # the folder and config.json: one line naming the file
    validate.check_model_type(path)
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 (any failure here means a config transformers cannot read)
        raise UserError(f"cannot read {path / 'config.json'} ({describe(err)}): restore the checkpoint's original "
                        f"config.json") from None


def _load_model(path: Path, *, dtype, meta: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    config = load_config(path)
    if not meta:
        validate.weight_headers(path)  # no weights, or damaged ones: one line before anything is built
    # on the meta device; unsupported or dense families and shapes that do not match the weights fail here, in one line
    skeleton = validate.skeleton(path, config, lambda: AutoModelForCausalLM.from_config(
        config, dtype=dtype or getattr(config, "dtype", None)))
    if meta:
        return skeleton
    try:
        # eager experts are the fastest on CPU for inference-sized batches (measured; see README)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", experts_implementation="eager")
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"cannot load the weights in {path}: {str(err).splitlines()[0]}") from None


def view(model: nn.Module) -> MoEView:
    adapter = get(model.config.model_type)
    moe, dense = [], []
    for i, decoder_layer in enumerate(decoder_layers(model)):
        block = getattr(decoder_layer, adapter.block, None)
        if block is not None and hasattr(block, adapter.experts):
            moe.append(_moe_layer(i, decoder_layer, block, adapter, model.config))
        else:
            dense.append(i)
    if not moe:
        raise UserError(f"this {adapter.model_type} model has no MoE layers (all {len(dense)} layers are dense)")
    return MoEView(model=model, adapter=adapter, layers=moe, dense_layers=dense)


def decoder_layers(model: nn.Module):
    """The decoder layers of a transformers causal LM (MoE and dense), in order."""
    base = getattr(model, "model", None) or model.base_model
    return base.layers


def _moe_layer(index: int, decoder_layer: nn.Module, block: nn.Module, adapter: Adapter, config) -> MoELayer:
    router, experts = getattr(block, adapter.router), getattr(block, adapter.experts)
    shared_owner = decoder_layer if adapter.shared_on_layer else block
    shared_mix = getattr(config, adapter.shared_mix_key) if adapter.shared_mix_key else "sum"
    if shared_mix not in ("sum", "average"):
        raise UserError(f"{adapter.shared_mix_key}={shared_mix!r}: moekit knows how to combine 'sum' and 'average'")
    return MoELayer(
        index=index,
        block=block,
        router=router,
        experts=experts,
        rule=adapter.rule(config, router),
        layout=adapter.layout or _layout_from_flags(experts),
        activation=adapter.activation(config) if adapter.activation else glu(config.hidden_act),
        adapter=adapter,
        shared=getattr(shared_owner, adapter.shared, None) if adapter.shared else None,  # absent or None: no shared
        shared_gate=getattr(block, adapter.shared_gate) if adapter.shared_gate else None,
        shared_mix=shared_mix,
        routed_scale=float(getattr(config, adapter.routed_scale_key)) if adapter.routed_scale_key else 1.0,
        router_softcap=float(getattr(config, adapter.router_softcap_key) or 0.0) if adapter.router_softcap_key else 0.0,
        post_norm=getattr(block, adapter.post_norm) if adapter.post_norm else None,
        identity_experts=int(getattr(config, adapter.identity_experts_key) or 0) if adapter.identity_experts_key else 0,
    )


def _layout_from_flags(experts: nn.Module) -> ExpertLayout:
    """transformers' `use_experts_implementation` decorator records the storage layout on the experts module."""
    return ExpertLayout(
        transposed=experts.is_transposed,
        interleaved=not experts.is_concatenated,
        has_bias=experts.has_bias,
        has_gate=experts.has_gate,
    )


__all__ = ["Adapter", "ExpertLayout", "MoELayer", "MoEView", "decoder_layers", "get", "load", "load_config", "register",
           "supported", "validate"]
