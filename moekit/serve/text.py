"""Tokens to text while streaming: incremental, UTF-8-safe detokenisation and stop strings held back.

Byte-level BPE tokens (GPT-2, Qwen, the demo model) split multi-byte characters: one CJK character or emoji is often
two or three tokens, and decoding a prefix of them gives U+FFFD. `Detokenizer` decodes a window of recent tokens and
emits only text that no later token can change: the new suffix, and only once it no longer ends in U+FFFD (the
prefix/read offsets of TGI and vLLM: the tokens emitted last are the left context of the next decode, which keeps
leading spaces and merges right). At the end of a sequence the rest is flushed as it decodes.

`StopStrings` holds back the longest tail of the text that is a prefix of a stop string (it could still become one),
so a client never sees part of a stop string (vLLM #3574); on a match the text is cut before the stop string (OpenAI's
convention: the stop sequence is not returned).
"""

from __future__ import annotations

_WINDOW = 6  # tokens of left context re-decoded with the new ones (merges and leading spaces depend on it)


class Detokenizer:
    def __init__(self, tokenizer, prompt_tail: list[int] | None = None):
        self.tok = tokenizer
        self.ids: list[int] = list(prompt_tail or [])[-_WINDOW:]  # ids[:read]: left context, already emitted
        self.read = len(self.ids)  # ids[read:]: tokens whose text is not emitted yet

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        """Add one generated token; returns the text that became final (maybe empty)."""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end: whatever the held tokens decode to (U+FFFD stays only where the bytes really are invalid)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        done = self._decode(self.ids[:self.read])
        text = self._decode(self.ids)
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""  # an incomplete character: wait for its next bytes
        self.ids = self.ids[self.read:]  # what is emitted now is the left context of the next decode (TGI's offsets)
        self.read = len(self.ids)
        return text[len(done):]


class StopStrings:
    """Text in, text safe to emit out; `stopped` once a stop string appeared (text from it on is dropped)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        buf = self.held + text
        cut = self._first(buf)
        # the earliest position where a stop may still complete with the next text; a complete stop found after it
        # ('B' in "::B" with stops B and ":B:") is not the first stop yet
        pending = len(buf) - max((_overlap(buf, s) for s in self.stops), default=0)
        if 0 <= cut <= pending:
            self.stopped, self.held = True, ""
            return buf[:cut]
        self.held = buf[pending:]
        return buf[:pending]

    def flush(self) -> str:
        out, self.held = self.held, ""
        cut = self._first(out)  # held text may hold a complete stop behind a pending longer one
        if cut >= 0:
            self.stopped = True
            return out[:cut]
        return out

    def _first(self, text: str) -> int:
        return min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the printable character byte-level BPE writes for each byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTES = _byte_decoder()


def token_bytes(tokenizer, token: int) -> bytes:
    """A token's own bytes (OpenAI's `bytes` field): exact for byte-level BPE, where one token can hold part of a
    character; the UTF-8 of its decoded text otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.decoder).__name__ == "ByteLevel":
        piece = tokenizer.convert_ids_to_tokens(token)
        if all(c in _BYTES for c in piece):
            return bytes(_BYTES[c] for c in piece)
    return tokenizer.decode([token]).encode()
