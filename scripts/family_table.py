"""Rewrite the README's family table (between <!-- families:start --> and <!-- families:end -->) from moekit's
registries: `python scripts/family_table.py` (tests/test_readme.py fails while the README is out of date)."""

from __future__ import annotations

from pathlib import Path

from moekit.models.summary import TABLE_END, TABLE_START, family_table

README = Path(__file__).resolve().parent.parent / "README.md"


def main() -> None:
    text = README.read_text()
    head, rest = text.split(TABLE_START)
    _, tail = rest.split(TABLE_END)
    README.write_text(f"{head}{TABLE_START}\n{family_table()}\n{TABLE_END}{tail}")
    print(f"wrote the family table of {README}")


if __name__ == "__main__":
    main()
