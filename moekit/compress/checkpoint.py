"""Writing output checkpoints atomically: a temporary folder beside the target, renamed into place when complete
(moekit.files.atomic_folder: a failed or killed write leaves nothing under the target's name)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from torch import nn

from moekit.files import atomic_folder

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


def save_checkpoint(model: nn.Module, out: Path, *, source: Path | None = None, report: dict | None = None,
                    overwrite: bool = False, extra: Callable[[Path], None] | None = None) -> Path:
    """save_pretrained (the family's checkpoint format: per-expert keys, which vLLM and SGLang load; fused for GPT-OSS,
    as it ships) + tokenizer files copied from `source` +
    compression.json, into `out`, atomically: nothing half-written is ever left at `out`. `extra(folder)` writes any
    further files (e.g. a quantised sidecar) into the folder before it is renamed into place."""
    out = Path(out)
    with atomic_folder(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES if source is not None else ():
            if (Path(source) / name).is_file() and not (tmp / name).exists():
                shutil.copy2(Path(source) / name, tmp / name)
        if report is not None:
            (tmp / "compression.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        if extra is not None:
            extra(tmp)
    return out
