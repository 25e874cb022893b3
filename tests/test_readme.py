"""The README's family table lists exactly the registered adapters."""

import re
from pathlib import Path

import moekit.models


def test_readme_lists_every_supported_family():
    text = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text()
    block = text.split("<!-- families:start -->")[1].split("<!-- families:end -->")[0]
    listed = set(re.findall(r"^\| ([a-z0-9_]+) \|", block, flags=re.M))
    assert listed - {"model_type"} == set(moekit.models.supported())
