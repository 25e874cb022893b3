"""Checking a checkpoint folder before a single weight is read, so a bad one fails in one line naming the file and the
fix instead of a traceback from deep inside transformers (or, worse, a silently half-random model).

What is checked, cheapest first (`open_checkpoint` runs all of it; `moekit.models.load` runs 1-4 on every load, so every
command and the Python API get them; a meta-device load accepts a config-only folder, shapes then come from the config):
  1. the folder, config.json (strict JSON, an object with a model_type), the weight files transformers would load
     (model.safetensors, else the shards of model.safetensors.index.json; PyTorch .bin is refused with the fix);
  2. every safetensors header parses and every tensor's byte range fits its file (the safetensors library's own
     header validation: a truncated or damaged file fails here), and every tensor the index lists is in its shard;
  3. the config builds a model on the meta device, and the model has MoE layers (a dense model is refused);
  4. the config's shapes match the weights: the header shapes are handed, as meta tensors, to transformers' own
     loading routine (`convert_and_load_state_dict_in_model` with the model's conversion mapping), which renames keys
     and fuses per-expert tensors exactly as `from_pretrained` does; what it reports missing (parameters only, tied
     weights aside) or of another shape is refused. No data is read: the meta tensors only carry shapes;
  5. when the command needs one, the tokenizer loads and turns text into tokens.
What cannot be checked: the tensor *values* (safetensors has no checksums: flipped bits inside the data go unnoticed).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moekit.errors import UserError, describe

WEIGHTS, INDEX, PYTORCH = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"
# a tokenizer's vocabulary lives in one of these; without any, AutoTokenizer returns an empty tokenizer silently
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                         "tekken.json", "sentencepiece.bpe.model", "tiktoken.model", "qwen.tiktoken")
MAX_LAYERS = 1024  # without weights to compare with: no released model has a tenth of this
_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
# keyed by (folder, its files' names, sizes and mtimes): each folder state is read and checked once per process
_headers_seen: dict[tuple, dict] = {}
_checked: dict[tuple, bool] = {}


@dataclass
class Tensor:
    file: str
    dtype: str  # safetensors dtype name ("BF16", ...)
    shape: tuple[int, ...]


@dataclass
class Checkpoint:
    """What `open_checkpoint` returns: the folder, its config, its MoE view on the meta device (shapes only) and its
    tokenizer (None unless asked for)."""

    path: Path
    config: object
    view: object  # moekit.models.MoEView on the meta device
    tokenizer: object | None = None


def open_checkpoint(path, *, tokenizer: bool = False, dtype=None, weights: bool = True) -> Checkpoint:
    """Every check of this module on the checkpoint folder `path`: call it first in a command, after the arguments
    that need no file and before any weight is read. tokenizer=True: the command needs one (trace, eval, run, serve,
    prune/merge/ablate with their data, quantize with calibration). weights=False: a config-only folder is fine (a
    run whose expert store is built already reads nothing else); weight files that are there are checked all the same.
    """
    import moekit.models

    path = Path(path)
    check_folder(path)
    if weights:
        weight_headers(path)  # no weights at all: refused here
    view = moekit.models.load(path, meta=True, dtype=dtype)  # headers, config, shapes, MoE layers
    return Checkpoint(path, view.config, view, load_tokenizer(path) if tokenizer else None)


def check_folder(path: Path) -> None:
    """Step 1: the folder and its config.json."""
    if not path.exists():
        raise UserError(f"no model at {path}: give a Hugging Face checkpoint folder (config.json + *.safetensors)")
    if not path.is_dir():
        raise UserError(f"{path} is a file: give the checkpoint folder that holds config.json and the weights")
    read_config_json(path)
    if (path / "generation_config.json").is_file():  # transformers reads it with the weights, generation uses it
        _json(path / "generation_config.json", "restore it from the original checkpoint (or delete it)")


def read_config_json(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise UserError(f"{path} has no config.json: give a Hugging Face checkpoint folder (config.json + weights)")
    config = _json(file, "restore it from the original checkpoint")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise UserError(f"{file} has no model_type: not a Hugging Face transformers config; give the folder that "
                        f"`save_pretrained` wrote")
    return config


def weight_headers(path: Path, required: bool = True) -> dict[str, Tensor] | None:
    """Step 2: the tensors of the files transformers would load, from their headers (no data read); None for a folder
    without weight files when not required."""
    key = _state_key(path)
    if key not in _headers_seen:
        _headers_seen.clear()  # one folder at a time is plenty: commands open one or two
        _headers_seen[key] = _weight_headers(path)
    headers = _headers_seen[key]
    if headers is None and required:
        raise UserError(f"{path} has no weights ({WEIGHTS} or {INDEX}): give the folder that `save_pretrained` wrote")
    return headers


def _weight_headers(path: Path) -> dict[str, Tensor] | None:
    if (path / WEIGHTS).is_file():
        return _headers(path / WEIGHTS)
    if (path / INDEX).is_file():
        return _sharded(path)
    if (path / PYTORCH).is_file() or any(path.glob("pytorch_model-*.bin")):
        raise UserError(f"{path} holds PyTorch .bin weights: moekit reads safetensors; convert them with "
                        f"AutoModelForCausalLM.from_pretrained({str(path)!r}).save_pretrained({str(path)!r})")
    return None


def _sharded(path: Path) -> dict[str, Tensor]:
    index_file = path / INDEX
    index = _json(index_file, "download or copy the checkpoint again")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise UserError(f"{index_file} has no weight_map of tensor names to shard files: download or copy the "
                        f"checkpoint again")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or not (path / shard).is_file():
            raise UserError(f"{index_file} names the shard {shard!r}, which is not a file in {path}: copy every "
                            f"shard of the checkpoint")
        tensors.update(_headers(path / shard))
    for key, shard in weight_map.items():
        if tensors.get(key) is None or tensors[key].file != shard:
            raise UserError(f"{index_file} puts {key} in {shard}, which does not hold it: the shards do not belong "
                            f"to this index; download or copy the checkpoint again")
    return tensors


def _headers(file: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt") as f:  # validates the header and that the offsets cover the file
            return {k: Tensor(file.name, f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                    for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as err:
        raise UserError(f"{file} is truncated or damaged ({describe(err)}): download or copy it again") from None


def _json(file: Path, fix: str):
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {file}: not valid JSON ({err}); {fix}") from None
    except OSError as err:
        raise UserError(f"cannot read {file} ({err.strerror or err}): {fix}") from None


def check_model_type(path: Path) -> None:
    """A model_type transformers does not know: too new for this transformers, or not a transformers config."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = read_config_json(path)["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise UserError(f"{path / 'config.json'}: model type {model_type!r} is unknown to transformers "
                        f"{transformers.__version__} (a newer release, or not a transformers model); moekit's MoE "
                        f"families: {', '.join(_supported())}")


def _supported() -> list[str]:
    from moekit.models.architecture import supported_types

    return supported_types()


def refuse_unsupported(path: Path, config) -> None:
    """A model_type without an adapter (nor a wrapper around one): say whether it is a dense model (no experts) or an
    MoE family moekit lacks. A multimodal wrapper is judged by its language model's config."""
    from moekit.models.architecture import adapter_of, supported_types, text_config

    try:
        adapter_of(config)
        return
    except UserError:
        pass
    file, text, supported = path / "config.json", text_config(config), ", ".join(supported_types())
    if not any(isinstance(getattr(text, k, None), int) and getattr(text, k) > 1 for k in EXPERT_COUNT_KEYS):
        raise UserError(f"{file}: {text.model_type!r} is not a supported MoE family: it is a dense model (no routed "
                        f"experts), and moekit works on Mixture-of-Experts checkpoints ({supported})")
    raise UserError(f"{file}: model type {text.model_type!r} is not a supported MoE family; supported: {supported}")


def skeleton(path: Path, config, build) -> nn.Module:
    """Steps 2-4 for `moekit.models.load`, once refuse_unsupported passed: build() the model on the meta device
    (buildable, with MoE layers) and check the weights' shapes against it, when there are weight files; returns it."""
    import moekit.models

    headers = weight_headers(path, required=False)  # a config-only folder gives shapes (info, a built store's run)
    check_layer_count(path, config, headers)
    model = build_meta(path, build)
    if headers is not None:
        check_shapes(model, path, headers)
    try:
        moekit.models.view(model)  # no MoE layers: refused before the weights are read
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    except ValueError as err:  # a routing rule the config makes impossible (top-k 0, more groups than experts, ...)
        raise UserError(f"{path / 'config.json'}: {describe(err)}: restore the checkpoint's original config.json") \
            from None
    return model


def check_layer_count(path: Path, config, headers: dict[str, Tensor] | None) -> None:
    """Before anything is built from it: a layer count far beyond what the weights hold (or, without weights, beyond
    any released model), since building 10^9 layers, even on the meta device, would not end. Modest differences are
    check_shapes' to report (some families count sublayers: LongCat-Flash's num_hidden_layers is twice its layers)."""
    from moekit.models.architecture import text_config

    layers = getattr(text_config(config), "num_hidden_layers", None)
    if not isinstance(layers, int):
        return  # transformers' own config validation and the build report it
    stored = {int(m.group(1)) for key in headers or () if (m := _LAYER_KEY.search(key))}
    limit = 4 * (max(stored) + 1) if stored else MAX_LAYERS
    if layers > limit:
        held = f"the weights hold {max(stored) + 1}" if stored else f"no released model has {MAX_LAYERS}"
        raise UserError(f"{path / 'config.json'} asks for {layers} layers, but {held}: the config is damaged or "
                        f"belongs to another model; restore the original config.json")


def build_meta(path: Path, build) -> nn.Module:
    """build() -> the model on the meta device; any failure means the config is inconsistent with the code."""
    try:
        with torch.device("meta"):
            return build()
    except Exception as err:  # arbitrary config values reach arbitrary model code: every failure means the same
        raise UserError(f"{path / 'config.json'} does not describe a model transformers can build "
                        f"({type(err).__name__}: {describe(err)}): restore the checkpoint's original config.json") \
            from None


def check_shapes(model: nn.Module, path: Path, tensors: dict[str, Tensor]) -> None:
    """Step 4: the weights' shapes (headers) against the model the config builds, through transformers' own key
    mapping and expert fusion; raises one UserError for the first problem. Runs once per folder state."""
    key = _state_key(path)
    if _checked.get(key):
        return
    report = _loading_report(model, tensors)
    if report is None:  # transformers' loading internals moved: compare the keys that need no conversion
        report = _plain_report(model, tensors)
    missing, mismatched, unfusable = report
    if unfusable:
        name, why = sorted(unfusable.items())[0]
        raise UserError(f"{path}: the weights cannot be assembled into {name} ({why}): a tensor in the weights has "
                        f"another shape than its siblings; the checkpoint is damaged or mixed from several models")
    if mismatched:
        name, got, want = sorted(mismatched)[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise UserError(f"{path}: {name} has shape {list(got)} in the weights but {list(want)} by config.json{more}: "
                        f"the config and the weights come from different models; restore the original config.json")
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{path}: the weights lack {sorted(missing)[0]}{more}, which config.json's model needs: the "
                        f"checkpoint is incomplete or belongs to another model; download or copy it again")
    _checked[key] = True


def _loading_report(model: nn.Module, tensors: dict[str, Tensor]):
    """(missing parameter names, {(name, weight shape, model shape)}, {name: why it could not be assembled}) from
    transformers' loading routine run on meta tensors, or None when this transformers lacks the routine."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
    except ImportError:
        return None
    from transformers.utils import logging as hf_logging

    model = copy.deepcopy(model)  # loading replaces parameters: the caller's skeleton stays as it was
    state = {k: torch.empty(t.shape, dtype=_DTYPES.get(t.dtype, torch.float32), device="meta")
             for k, t in tensors.items()}
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    async_load = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"  # meta tensors need no loader threads (their start-up cost 12% here)
    try:
        config = LoadStateDictConfig(device_map={"": "meta"}, weight_mapping=get_model_conversion_mapping(model))
        info, _ = convert_and_load_state_dict_in_model(model, state, config)
        model._adjust_missing_and_unexpected_keys(info)
    except (TypeError, AttributeError):
        return None  # another signature: fall back rather than guess
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if async_load is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = async_load
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    missing = {k for k in info.missing_keys if k in params} - _tied_present(model, info.missing_keys)
    mismatched = {(name, tuple(got), tuple(want)) for name, got, want in info.mismatched_keys}
    errors = getattr(info, "conversion_errors", None) or {}
    unfusable = {name: _conversion_problem(text) for name, text in errors.items()}
    return missing - set(unfusable), mismatched, unfusable


def _conversion_problem(text: str) -> str:
    """transformers records a failed conversion as traceback + message + "Error: <op> on tensors destined for ...":
    the message line is what the user needs (e.g. "stack expects each tensor to be equal size, ...")."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if len(lines) > 1 and lines[-1].startswith("Error"):
        lines.pop()
    return lines[-1] if lines else "conversion failed"


def _tied_present(model: nn.Module, missing: set[str]) -> set[str]:
    """Missing names that a tied weight present in the checkpoint provides (e.g. lm_head tied to the embeddings)."""
    out = set()
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target in missing and source not in missing:
            out.add(target)
        elif source in missing and target not in missing:
            out.add(source)
    return out


def _plain_report(model: nn.Module, tensors: dict[str, Tensor]):
    """Fallback: shapes of the keys named alike on disk and in memory (converted experts cannot be compared)."""
    logging.getLogger(__name__).warning("this transformers has no convert_and_load_state_dict_in_model: only tensors "
                                        "stored under their in-memory names are checked against config.json")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return set(), {(k, t.shape, shapes[k]) for k, t in tensors.items() if k in shapes and shapes[k] != t.shape}, {}


def _state_key(path: Path) -> tuple:
    stats = []
    for f in sorted(path.iterdir()):
        if f.suffix in (".json", ".safetensors"):
            st = f.stat()
            stats.append((f.name, st.st_size, st.st_mtime_ns))
    return (str(path.resolve()), tuple(stats))


def check_routing(routing, view) -> None:
    """A routing policy (moekit.routing.Routing, or None) against the model, on its meta-device view: the layers,
    expert ids and K it names (each policy's own bind checks; they read no weights). skip=auto calibrates on the
    loaded model later; here only that the model routes to more than one expert."""
    if routing is None:
        return
    from moekit.routing.policies import Policy, Skip

    routing = routing.fresh()  # a copy: per-request state stays unbound
    routing.check(view)  # the family's own refusals (Adapter.fixed_routing, hash-routed layers) and each policy's
    for policy in routing.policies:  # bind: what a policy reads (a replay trace) checked too
        if isinstance(policy, Skip) and policy.beta is None and not policy.betas:
            if view.top_k < 2:
                raise UserError(f"{policy.spec()} drops experts after the first, but the model routes each token to "
                                f"one expert")
            Policy.bind(policy, view)  # its layers
        else:
            policy.bind(view)


def load_tokenizer(path):
    """The checkpoint's tokenizer, or one line saying it has none or it is damaged (generation and tokenising data
    need one). AutoTokenizer alone returns an empty tokenizer for a folder without vocabulary files: refused here."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    fix = f"save one into the checkpoint folder (tokenizer.save_pretrained({str(path)!r}))"
    if not any((path / name).is_file() for name in TOKENIZER_VOCAB_FILES):
        raise UserError(f"{path} has no tokenizer ({' / '.join(TOKENIZER_VOCAB_FILES[:3])} ...): {fix}")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(path)
        probe = tok("The", add_special_tokens=False)["input_ids"]
    except Exception as err:  # tokenizers, sentencepiece and json raise many types for a bad file; all mean the same
        raise UserError(f"{path} has no usable tokenizer ({type(err).__name__}: {describe(err)}): {fix}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if not probe:
        raise UserError(f"{path}: its tokenizer turns text into no tokens (an empty vocabulary): {fix}")
    return tok

