"""The README's family table is the one scripts/family_table.py generates from the registries: every adapter and
multimodal wrapper, nothing else."""

import re
from pathlib import Path

import moekit.models
from moekit.models.architecture import wrappers
from moekit.models.summary import TABLE_END, TABLE_START, family_table


def _block() -> str:
    text = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text()
    return text.split(TABLE_START)[1].split(TABLE_END)[0].strip()


def test_readme_family_table_is_generated_from_the_registry():
    assert _block() == family_table(), "the README's family table is stale: run python scripts/family_table.py"


def test_readme_lists_every_supported_family_and_wrapper():
    listed = set(re.findall(r"^\| ([a-z0-9_-]+) \|", _block(), flags=re.M))
    assert listed - {"model_type", "---"} == set(moekit.models.supported()) | set(wrappers())
