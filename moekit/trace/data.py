"""What gets traced: data specs -> documents -> token sequences (non-overlapping windows that never cross a document).

Everything here streams: a document at a time, a window at a time, so any amount of data fits in memory. The order is
deterministic, which is what makes --resume exact: a resumed run regenerates the same sequence stream and skips the
sequences of completed chunks.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moekit.errors import UserError

DOC_SEP = "<|endoftext|>"  # a line holding only this separates documents in a .txt file (the demo corpus format)
CORPUS_DIRS = (Path("demo/corpus/heldout"), Path(__file__).resolve().parents[2] / "demo/corpus/heldout")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_CHECKED: set[tuple] = set()  # files check_source passed, by (path, kind, size, mtime)


@dataclass(frozen=True)
class Source:
    spec: str  # as the user wrote it
    path: Path
    kind: str  # txt | jsonl
    domain: str  # default domain (a JSONL row's `domain` or `label` field overrides it)

    def describe(self) -> dict:
        return {"spec": self.spec, "path": str(self.path), "kind": self.kind, "domain": self.domain}


@dataclass(frozen=True)
class Sequence:
    seq_id: int
    domain: str
    token_ids: np.ndarray  # [S] int32, S <= seq_len
    start: int  # position of the first token within its document


def resolve_data(specs: Iterable[str], corpus_dirs: Iterable[Path] = CORPUS_DIRS) -> list[Source]:
    """--data values (each may be comma-separated) -> sources. A spec is a .txt / .jsonl file, or a demo-corpus domain."""
    names = [s.strip() for spec in specs for s in spec.split(",") if s.strip()]
    if not names:
        raise UserError("no data given: pass --data FILE.txt, FILE.jsonl or a demo-corpus domain such as --data code,prose")
    sources = [_resolve_one(name, list(corpus_dirs)) for name in names]
    for source in sources:
        st = source.path.stat()
        key = (str(source.path.resolve()), source.kind, st.st_size, st.st_mtime_ns)
        if key not in _CHECKED:  # a command resolves its data more than once: read each file once
            check_source(source)
            _CHECKED.add(key)
    return sources


def check_source(source: Source, step: int = 1 << 20) -> None:
    """Read the whole file once before any weight is loaded: strict UTF-8 without NUL bytes (a binary file is refused
    instead of being tokenised as replacement characters), every JSONL line an object with a string `text`, and some
    text at all. ~1 s per GB of text, against hours of tracing it."""
    decoder, offset, text_seen, tail, n = codecs.getincrementaldecoder("utf-8")("strict"), 0, False, "", 0
    fix = "give a UTF-8 .txt file or a .jsonl file with a `text` field per line"
    with open(source.path, "rb") as f:
        while True:
            block = f.read(step)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                raise UserError(f"{source.path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                                f"{offset + err.start}): {fix}") from None
            if "\x00" in text:
                raise UserError(f"{source.path} holds NUL bytes, so it is binary, not text: {fix}")
            if source.kind == "jsonl":
                lines = (tail + text).split("\n")
                tail = lines.pop() if block else ""  # a line cut by the block boundary waits for the next block
                for line in lines:
                    n += 1
                    row = _jsonl_row(source, line, n)
                    text_seen = text_seen or bool(row and row["text"].strip())
            else:
                text_seen = text_seen or bool(text.replace(DOC_SEP, "").strip())
            offset += len(block)
            if not block:
                break
    if not text_seen:
        raise UserError(f"{source.path} holds no text: {fix}")


def _jsonl_row(source: Source, line: str, n: int | None = None) -> dict | None:
    """One JSONL line as its object (None for a blank line); UserError for a line that is not an object with a string
    `text`."""
    if not line.strip():
        return None
    where = f"{source.path}:{n}" if n is not None else str(source.path)
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON ({err.msg}: {line.strip()[:40]!r}); give one JSON object per "
                        f"line") from None
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise UserError(f"{where}: each JSONL line needs a string field `text` (got {line.strip()[:40]!r})")
    return row


def _resolve_one(name: str, corpus_dirs: list[Path]) -> Source:
    path = Path(name)
    if path.is_file():
        kind = "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "txt"
        return Source(name, path, kind, path.stem)
    for folder in corpus_dirs:
        candidate = folder / f"{name}.txt"
        if "/" not in name and candidate.is_file():
            return Source(name, candidate, "txt", name)
    known = sorted({p.stem for d in corpus_dirs if d.is_dir() for p in d.glob("*.txt")})
    hint = f"; demo-corpus domains: {', '.join(known)}" if known else ""
    raise UserError(f"--data {name}: no such file and not a demo-corpus domain{hint}")


def documents(source: Source) -> Iterator[tuple[str, str]]:
    """(text, domain) per document, read line by line."""
    if source.kind == "jsonl":
        yield from _jsonl_documents(source)
    else:
        yield from ((text, source.domain) for text in _txt_documents(source.path))


def _txt_documents(path: Path) -> Iterator[str]:
    lines: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.rstrip("\r\n") == DOC_SEP:
                if "".join(lines).strip():
                    yield "".join(lines).strip("\n")
                lines = []
            else:
                lines.append(line)
    if "".join(lines).strip():
        yield "".join(lines).strip("\n")


def _jsonl_documents(source: Source) -> Iterator[tuple[str, str]]:
    with open(source.path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            row = _jsonl_row(source, line, n)
            if row is not None:
                yield row["text"], str(row.get("domain", row.get("label", source.domain)))


def encoder(tokenizer) -> Callable[[str], list[int]]:
    """A tokenizer (transformers or `tokenizers`) -> text -> ids, with the eos token appended when the tokenizer has
    one, as the demo model saw every document in training."""
    if hasattr(tokenizer, "encode_plus") or hasattr(tokenizer, "apply_chat_template"):  # transformers tokenizer
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        # verbose=False: documents longer than model_max_length are fine here, they are cut into windows
        return lambda text: list(tokenizer.encode(text, add_special_tokens=False, verbose=False)) + eos
    if hasattr(tokenizer, "encode"):  # tokenizers.Tokenizer or anything with encode(text) -> ids / Encoding
        def encode(text: str) -> list[int]:
            out = tokenizer.encode(text)
            return list(getattr(out, "ids", out))

        return encode
    raise ValueError(f"cannot tokenize with a {type(tokenizer).__name__}: it has no encode()")


def sequences(
    sources: list[Source], encode: Callable[[str], list[int]], seq_len: int, max_tokens: int | None = None
) -> Iterator[Sequence]:
    """Non-overlapping windows of at most seq_len tokens of each document, sources in order. max_tokens is split
    equally across the sources (so a multi-domain run covers every domain); a source stops at its share (its last
    window cut to fit) and hands what it did not use to the sources after it."""
    if seq_len < 1:
        raise UserError(f"--seq-len must be >= 1, got {seq_len}")
    seq_id, total = 0, 0
    for i, source in enumerate(sources):
        budget = None if max_tokens is None else total + (max_tokens - total) // (len(sources) - i)
        for seq in _source_windows(source, encode, seq_len, seq_id, budget, total):
            yield seq
            seq_id, total = seq_id + 1, total + len(seq.token_ids)
            if budget is not None and total >= budget:
                break


def _source_windows(source, encode, seq_len, seq_id, budget, total) -> Iterator[Sequence]:
    for text, domain in documents(source):
        ids = np.asarray(encode(text), dtype=np.int32)  # [N]
        for start in range(0, len(ids), seq_len):
            window = ids[start:start + seq_len]
            if budget is not None:
                window = window[: budget - total]
            if len(window) == 0:
                return
            yield Sequence(seq_id, domain, window, start)
            seq_id, total = seq_id + 1, total + len(window)
