"""Offloaded runs straight from a checkpoint, never holding all its experts in memory.

`build_store_from_checkpoint` (once per checkpoint): transformers' own `from_pretrained` with a device map that sends
every routed-experts module to "disk" (accelerate's offload folder, a temporary folder next to the store) and the rest
to "cpu". transformers applies its checkpoint conversions (per-expert keys -> fused [E, ...] tensors, renamings) as
it does for any load, and writes each converted expert tensor to the offload folder as it goes, so memory holds the
resident weights plus the tensors being converted, not the experts. The store's layer files are then written one layer
at a time from the offload folder, and the folder is removed. Costs: the experts are read once and written twice; the
offload folder needs as much free disk as the experts.

`load_from_store` (every run): the model skeleton on the meta device from the config, the resident weights assigned
from the store's `resident.safetensors` (in-memory names: no conversion), the fused expert parameters left on meta for
`offload` to serve from the store. Nothing of the checkpoint's weights is read.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

import moekit.models
from moekit.errors import UserError, describe
from moekit.files import disk_errors, write_failure
from moekit.runtime.store import (
    RESIDENT,
    _manifest,
    _native_names,
    damaged,
    fused_expert_tensors,
    read_manifest,
    resident_tensors,
    write_store,
)


def _expert_modules(view) -> dict[str, object]:
    """qualified module name -> MoELayer, for the routed-experts modules."""
    names = {id(m): n for n, m in view.model.named_modules()}
    return {names[id(layer.experts)]: layer for layer in view.layers}


def _device_map(view) -> dict[str, str]:
    """Experts modules on "disk", every other tensor on "cpu", named module by module: accelerate then keeps those as
    they are and hooks only the offloaded modules. A module above an experts module (a MoE block with its own
    tensors, e.g. a routing bias) is named tensor by tensor, since naming it would place its whole subtree."""
    experts = _expert_modules(view)
    dmap = {}
    for name, module in view.model.named_modules():
        if name in experts or any(name.startswith(e + ".") for e in experts):
            dmap.update({name: "disk"} if name in experts else {})
            continue
        tensors = [n for n, t in [*module._parameters.items(), *module._buffers.items()] if t is not None]
        if not tensors:
            continue
        if any(e.startswith(name + ".") or not name for e in experts):
            dmap.update({f"{name}.{n}" if name else n: "cpu" for n in tensors})
        else:
            dmap[name] = "cpu"
    return dmap


def build_store_from_checkpoint(path, directory, *, progress=None, skeleton=None) -> Path:
    """The expert store of the checkpoint at `path` in `directory` (kept if it is already there); returns it.
    progress() is called once per MoE layer written. skeleton: the checkpoint's meta-device view, if the caller has
    one (it is only read)."""
    from accelerate.hooks import remove_hook_from_submodules

    path, directory = Path(path), Path(directory)
    skeleton = skeleton or moekit.models.load(path, meta=True)  # one-line error for unsupported/dense models
    if (directory / "manifest.json").is_file():
        check_store(directory, skeleton)
        return directory
    offload = directory.with_name(f".{directory.name}.offload")
    shutil.rmtree(offload, ignore_errors=True)  # left by a killed build
    with disk_errors(offload):
        offload.parent.mkdir(parents=True, exist_ok=True)
    try:
        try:
            with _quiet_loading(), _heap_returns_memory():
                model = moekit.models.model_class(skeleton.model_config).from_pretrained(
                    path, dtype="auto", device_map=_device_map(skeleton), offload_folder=str(offload),
                    experts_implementation="eager")
        except Exception as err:  # noqa: BLE001 (sorted below)
            full = write_failure(offload, err, full_only=True)  # the offload folder's writes meet a full disk first
            if full is not None:
                raise full from None
            if not isinstance(err, (OSError, ValueError, RuntimeError)):
                raise
            raise UserError(f"cannot load the weights in {path}: {describe(err)}") from None
        view = moekit.models.load(model)
        hooks = {name: getattr(view.model.get_submodule(name), "_hf_hook", None) for name in _expert_modules(view)}

        def offloaded(module_name: str, tensor_name: str) -> torch.Tensor:  # accelerate's weights_map: file-backed
            # a module inside an experts module (MuseSpark's post_expert_norm) is offloaded with it
            owner = next(n for n in hooks if module_name == n or module_name.startswith(n + "."))
            return hooks[owner].weights_map[f"{module_name[len(owner) + 1:]}.{tensor_name}".lstrip(".")]

        def fused():
            for name, layer in _expert_modules(view).items():
                yield layer.index, {k: offloaded(name, v) for k, v in _native_names(layer.layout).items()}

        resident = resident_tensors(view, fetch=offloaded)
        write_store(directory, _manifest(view), fused(), resident, progress=progress)
        remove_hook_from_submodules(model)
    finally:
        shutil.rmtree(offload, ignore_errors=True)
    return directory


@contextlib.contextmanager
def _heap_returns_memory(threshold: int = 1 << 20):
    """glibc keeps freed blocks below its mmap threshold in the heap, and raises that threshold to the size of each
    large block freed (up to 32 MiB): the per-expert tensors the loading materialises, stacks and frees layer after
    layer then stay in the process, which looks as if the build held every expert (measured on a checkpoint with
    192 MiB of experts in 8 layers: RssAnon peaked 222 MiB above its start, 102 MiB with this). A fixed threshold
    for the build, then back to where glibc's own would settle, and the freed heap trimmed. A no-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield
        return
    m_mmap_threshold = -3  # glibc's M_MMAP_THRESHOLD
    mallopt(m_mmap_threshold, threshold)
    try:
        yield
    finally:
        mallopt(m_mmap_threshold, 32 << 20)
        trim(0)


@contextlib.contextmanager
def _quiet_loading():
    """Silence what is expected here: accelerate's notes on tensor-level device-map keys and on offloaded weights,
    transformers' per-tensor progress bar (the CLI shows one bar per MoE layer written)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    accelerate_log = logging.getLogger("accelerate")
    accelerate_level = accelerate_log.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    accelerate_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The following device_map keys do not match")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        accelerate_log.setLevel(accelerate_level)
        if bars:
            hf_logging.enable_progress_bar()


def check_store(directory: Path, view) -> None:
    """Refuse a store built from another model (dtype aside: the skeleton's is nominal)."""
    have = read_manifest(Path(directory))
    want = _manifest(view)
    keys = ("model_type", "layers", "num_experts", "layout", "shapes")
    if {k: have.get(k) for k in keys} != {k: want[k] for k in keys}:
        raise UserError(f"{directory} holds an expert store of another model; remove it or choose another --store")


def load_from_store(path, directory, *, skeleton=None):
    """The MoEView of the checkpoint at `path` with its resident weights read from the store in `directory` and its
    routed experts' fused parameters on the meta device (call `offload` next). skeleton: the checkpoint's meta-device
    view, if the caller has one; it is filled in place and must not be used afterwards."""
    from transformers import GenerationConfig

    path, directory = Path(path), Path(directory)
    view = skeleton or moekit.models.load(path, meta=True)
    check_store(directory, view)
    model = view.model
    tensors, aliases = _read_resident(directory)
    loaded = {name: _assign(model, name, t) for name, t in tensors.items()}
    for alias, name in aliases.items():
        _assign(model, alias, loaded[name])  # the very same Parameter: tied weights stay tied
    experts = fused_expert_tensors(view)
    for module_name, module in model.named_modules():
        for n, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is not None and t.device.type == "meta" and (id(module), n) not in experts:
                raise UserError(f"{directory}: {module_name}.{n} is missing from {RESIDENT}; delete the store to "
                                f"rebuild it")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.set_experts_implementation("eager")
    return moekit.models.load(model.eval())  # a fresh view: the skeleton's captured its tensors on the meta device


def _read_resident(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, aliases {tied name: stored name}) of the store's resident.safetensors; one line if it is damaged."""
    from safetensors import SafetensorError

    try:
        with safe_open(directory / RESIDENT, framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise damaged(directory, f"{RESIDENT}: {describe(err)}") from None
    if not isinstance(aliases, dict) or not all(isinstance(v, str) and v in tensors for v in aliases.values()):
        raise damaged(directory, f"{RESIDENT}: its aliases name tensors it does not hold")
    return tensors, aliases


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
    """Set parameter or buffer `name` of `model` to `value` (wrapped as a Parameter for parameters); returns what was
    set."""
    module_name, _, n = name.rpartition(".")
    module = model.get_submodule(module_name)
    if n in module._parameters:
        value = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
        module._parameters[n] = value
    elif n in module._buffers:
        module._buffers[n] = value
    else:
        raise UserError(f"the store's resident weight {name} is not in this model; delete the store to rebuild it")
    return value
