"""The MoE view: `load(path_or_model)` -> MoEView. Adapters are registered in moekit/models/families*.py."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moekit.errors import UserError, describe
from moekit.models import (  # noqa: F401  (registers the adapters and wrappers)
    families, families_more, families_seq2seq, families_sigmoid, families_softmax, families_wrappers,
)
from moekit.models import validate
from moekit.models.architecture import (
    adapter_of, decoder_layers, get_path, language_model, model_class, stacks, text_config,
)
from moekit.models.registry import Adapter, ExpertLayout, get, register, supported
from moekit.models.view import BlockMLP, MoELayer, MoEView
from moekit.ops.activations import glu, plain


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
    config = load_config(path)
    if not meta:
        validate.weight_headers(path)  # no weights, or damaged ones: one line before anything is built
    validate.refuse_unsupported(path, config)  # unsupported or dense families: one line, before any weight is read
    cls = model_class(config)  # AutoModelForCausalLM, or the wrapper's / encoder-decoder's Auto class
    # on the meta device; configs that cannot be built and shapes that do not match the weights fail here, in one line
    skeleton = validate.skeleton(path, config, lambda: cls.from_config(
        config, dtype=dtype or getattr(config, "dtype", None)))
    if meta:
        return skeleton
    try:
        # eager experts are the fastest on CPU for inference-sized batches (measured; see README)
        return cls.from_pretrained(path, dtype=dtype or "auto", experts_implementation="eager")
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"cannot load the weights in {path}: {str(err).splitlines()[0]}") from None


def view(model: nn.Module) -> MoEView:
    adapter, config = adapter_of(model.config), text_config(model.config)
    moe, dense, every = [], [], []
    for kind, layers, block_path in stacks(model, adapter):
        for decoder_layer in layers:
            i = len(every)
            every.append(decoder_layer)
            block = get_path(decoder_layer, block_path, None)
            if block is not None and _is_moe_block(block, adapter):
                moe.append(_moe_layer(i, kind, decoder_layer, block, adapter, config))
            else:
                dense.append(i)
    if not moe:
        raise UserError(f"this {adapter.model_type} model has no MoE layers (all {len(dense)} layers are dense)")
    return MoEView(model=model, adapter=adapter, layers=moe, dense_layers=dense, text_config=config,
                   decoder_layers=every)


def _is_moe_block(block: nn.Module, adapter: Adapter) -> bool:
    experts = get_path(block, adapter.experts, None)
    if experts is None:
        return False
    if adapter.per_expert:
        return hasattr(experts, "expert_0")
    return get_path(experts, dict(adapter.fused).get("down_proj", "down_proj"), None) is not None


def _moe_layer(index: int, kind: str, decoder_layer: nn.Module, block: nn.Module, adapter: Adapter,
               config) -> MoELayer:
    router, experts = get_path(block, adapter.router), get_path(block, adapter.experts)
    shared_owner = decoder_layer if adapter.shared_on_layer else block
    shared_mix = getattr(config, adapter.shared_mix_key) if adapter.shared_mix_key else "sum"
    if shared_mix not in ("sum", "average"):
        raise UserError(f"{adapter.shared_mix_key}={shared_mix!r}: moekit knows how to combine 'sum' and 'average'")
    layout = adapter.layout or _layout_from_flags(experts)
    return MoELayer(
        index=index,
        block=block,
        router=router,
        experts=experts,
        rule=adapter.rule(config, router),
        layout=layout,
        activation=_activation(adapter, config, experts, layout),
        adapter=adapter,
        shared=_shared(adapter, shared_owner),
        shared_gate=getattr(block, adapter.shared_gate) if adapter.shared_gate else None,
        shared_mix=shared_mix,
        routed_scale=float(getattr(config, adapter.routed_scale_key)) if adapter.routed_scale_key else 1.0,
        router_softcap=float(getattr(config, adapter.router_softcap_key) or 0.0) if adapter.router_softcap_key else 0.0,
        post_norm=getattr(block, adapter.post_norm) if adapter.post_norm else None,
        identity_experts=int(getattr(config, adapter.identity_experts_key) or 0) if adapter.identity_experts_key else 0,
        kind=kind,
        passes=_passes(adapter, config, index),
        router_logit_scale=float(getattr(config, adapter.router_logit_scale_key)) if adapter.router_logit_scale_key
        else 1.0,
        token_dropout=float(getattr(config, adapter.token_dropout_key) or 0.0) if adapter.token_dropout_key else 0.0,
    )


def _passes(adapter: Adapter, config, index: int) -> int:
    """How many times one forward runs layer `index` (Inkling2-Loop's loop layers: loop_num_passes)."""
    if adapter.loop_keys is None:
        return 1
    first, end, passes = (getattr(config, k) for k in adapter.loop_keys)
    return int(passes) if first <= index < end else 1


def _shared(adapter: Adapter, owner: nn.Module):
    if adapter.shared_block_mlp:
        return BlockMLP(owner)
    return get_path(owner, adapter.shared, None) if adapter.shared else None  # absent or None: no shared expert


def _activation(adapter: Adapter, config, experts: nn.Module, layout: ExpertLayout):
    """The family's expert activation: the adapter's (given the config and the experts module), else act(gate) * up
    with config.hidden_act, or act(up) for experts without a gate."""
    if adapter.activation is not None:
        return adapter.activation(config, experts)
    return glu(config.hidden_act) if layout.has_gate else plain(config.hidden_act)


def _layout_from_flags(experts: nn.Module) -> ExpertLayout:
    """transformers' `use_experts_implementation` decorator records the storage layout on the experts module."""
    return ExpertLayout(
        transposed=experts.is_transposed,
        interleaved=not experts.is_concatenated,
        has_bias=experts.has_bias,
        has_gate=experts.has_gate,
    )


__all__ = ["Adapter", "ExpertLayout", "MoELayer", "MoEView", "decoder_layers", "get", "language_model", "load",
           "load_config", "model_class", "register", "supported", "text_config", "validate"]
