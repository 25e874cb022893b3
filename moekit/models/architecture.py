"""Which transformers class loads a checkpoint, which of its configs holds the MoE keys, and where its MoE layers are.

The one place that knows checkpoints come in three shapes:
  causal LM           config.model_type is an adapter's (Mixtral, DeepSeek-V3, ...): AutoModelForCausalLM
  multimodal wrapper  an image-text-to-text / omni config whose text config is an adapter's (Llama 4, Qwen3-VL-MoE,
                      GLM-4.5V, ...): AutoModelForMultimodalLM, so the towers and the wrapper config stay as they are;
                      the MoE keys live in (and edits go to) the text config
  encoder-decoder     an adapter with `stacks` (Switch Transformers, NLLB-MoE): AutoModelForSeq2SeqLM
Wrappers are data, registered here like adapters (moekit/models/families_wrappers.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moekit.errors import UserError
from moekit.models.registry import Adapter, get
from moekit.registry import Registry


@dataclass(frozen=True)
class Wrapper:
    """A multimodal model type whose language model is a supported MoE family."""

    model_type: str
    text_config: str = "text_config"  # attribute path, from the wrapper config, of the language model's config
    layers: str = "model.language_model.layers"  # attribute path, from the loaded model, of its decoder layers
    base: str = "model"  # the module a text-only forward without the LM head calls (the wrapper's base model)
    lm: str = ""  # the module a text-only forward with the LM head calls ("" = the wrapper itself)
    notes: str = ""


_WRAPPERS: Registry = Registry("wrapper")


def register_wrapper(wrapper: Wrapper) -> Wrapper:
    return _WRAPPERS.register(wrapper.model_type, wrapper)


def wrappers() -> dict[str, Wrapper]:
    return dict(sorted(_WRAPPERS.items()))


def wrapper_of(config) -> Wrapper | None:
    return _WRAPPERS.get(config.model_type)


def text_config(config):
    """The config holding the MoE keys (expert counts, top-k): the wrapper's text config, else the config itself."""
    wrapper = wrapper_of(config)
    return get_path(config, wrapper.text_config) if wrapper else config


def adapter_of(config) -> Adapter:
    """The adapter of a checkpoint config; unsupported families fail here, in one line listing the supported ones."""
    if wrapper_of(config) is None and config.model_type not in supported_types():
        get(config.model_type)  # raises the UserError naming what is supported
    return get(text_config(config).model_type)


def supported_types() -> list[str]:
    """Every model_type moekit opens: the adapters' and the wrappers'."""
    from moekit.models.registry import supported

    return sorted({*supported(), *_WRAPPERS})


def model_class(config):
    """The transformers Auto class that loads (and reloads) a checkpoint with this config: AutoModelForMultimodalLM
    for wrappers, else the first of AutoModelForCausalLM / AutoModelForSeq2SeqLM / AutoModelForMultimodalLM that maps
    the config (Mistral 4's causal LM is only mapped as a multimodal LM)."""
    import transformers
    from transformers.models.auto import modeling_auto as auto

    candidates = [("AutoModelForCausalLM", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                  ("AutoModelForSeq2SeqLM", auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
                  ("AutoModelForMultimodalLM", auto.MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES)]
    if wrapper_of(config) is not None:
        candidates = candidates[2:]
    for name, mapping in candidates:
        if config.model_type in mapping:
            return getattr(transformers, name)
    raise UserError(f"{config.model_type} is the language model of a multimodal model and transformers has no class "
                    f"that loads it alone: give the multimodal checkpoint it belongs to")


def loads_with_causal_lm(config) -> bool:
    """Whether plain AutoModelForCausalLM maps this config (moekit's reload contract where it can hold)."""
    from transformers.models.auto import modeling_auto as auto

    return config.model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def stacks(model: nn.Module, adapter: Adapter) -> list[tuple[str, nn.ModuleList, str]]:
    """(kind, layers, MoE-block path) per layer stack, in order: the encoder then the decoder of an encoder-decoder
    model, else the one decoder stack ("decoder") of a causal LM or of a wrapper's language model."""
    if adapter.stacks:
        return [(kind, get_path(model, layers), block) for kind, layers, block in adapter.stacks]
    return [("decoder", decoder_layers(model), adapter.block)]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM or of a wrapper's language model (MoE and dense), in order."""
    wrapper = wrapper_of(model.config)
    if wrapper is not None:
        return get_path(model, wrapper.layers)
    base = getattr(model, "model", None) or model.base_model
    return base.layers


def base_model(model: nn.Module) -> nn.Module:
    """The module a forward without the LM head calls: the wrapper's base model, else the causal LM's decoder stack
    (encoder-decoder models run whole)."""
    wrapper = wrapper_of(model.config)
    if wrapper is not None:
        return get_path(model, wrapper.base)
    return getattr(model, "model", None) or model.base_model


def language_model(model: nn.Module) -> nn.Module:
    """The module that maps text token ids to next-token logits: the model itself, or the causal LM inside a wrapper
    whose own forward cannot take text alone (transformers 5.24's Llama4ForConditionalGeneration.forward reads
    `image_outputs` from its language model's output, which has none, so it fails on every input)."""
    wrapper = wrapper_of(model.config)
    return get_path(model, wrapper.lm) if wrapper is not None else model


def get_path(obj, path: str, default=...):
    """Follow a dotted attribute path ("" is obj itself); integer parts index module lists ("layer.-1.mlp")."""
    for part in path.split(".") if path else ():
        if part.lstrip("-").isdigit() and isinstance(obj, (nn.ModuleList, list, tuple)):
            obj = obj[int(part)]
        elif hasattr(obj, part):
            obj = getattr(obj, part)
        elif default is not ...:
            return default
        else:
            raise AttributeError(f"{type(obj).__name__} has no {part!r} (path {path!r})")
    return obj
