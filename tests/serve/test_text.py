"""Incremental detokenisation (CJK, Cyrillic, emoji split over byte-level tokens) and stop-string hold-back."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from moekit.serve.text import Detokenizer, StopStrings, token_bytes

DEMO = Path(__file__).resolve().parents[2] / "demo"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEMO / "model")


@pytest.mark.parametrize("domain", ["japanese", "russian", "dialogue", "code"])
def test_streamed_pieces_join_to_the_text_and_never_hold_a_replacement_char(tok, domain):
    text = (DEMO / "corpus" / "heldout" / f"{domain}.txt").read_text()[:1500] + " 😀🎉 naïve 日本語"
    ids = tok(text).input_ids
    split = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert split, "the text must hold characters split over tokens, or the test proves nothing"
    prompt, gen = ids[:7], ids[7:]
    d = Detokenizer(tok, prompt)
    pieces = [d.push(t) for t in gen] + [d.flush()]
    assert "".join(pieces) == tok.decode(gen, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)


def test_invalid_bytes_come_out_at_the_end(tok):
    half = next(i for i in range(len(tok)) if tok.decode([i]) == "\ufffd")  # a lone partial character
    d = Detokenizer(tok)
    assert d.push(half) == ""
    assert d.flush() == "\ufffd"


def test_token_bytes_are_the_raw_bytes(tok):
    text = "日本語 😀 привет"
    ids = tok(text).input_ids
    assert b"".join(token_bytes(tok, i) for i in ids).decode() == text


def test_stop_string_is_cut_and_never_leaks():
    s = StopStrings(["\nA:", "END"])
    out = [s.push(x) for x in ["Hello", " world\n", "A", ": more"]]
    assert out == ["Hello", " world", "", ""] and s.stopped
    s = StopStrings(["END"])
    assert [s.push("abcE"), s.push("N"), s.push("x")] == ["abc", "", "ENx"] and not s.stopped
    assert s.flush() == ""


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abAB:\n", max_size=40), st.lists(st.text(alphabet="abAB:\n", min_size=1, max_size=4),
                                                          max_size=3), st.data())
def test_hold_back_property(text, stops, data):
    """Whatever the chunking, the emitted text is the text cut before the first stop string, and what has been
    emitted at any moment is a prefix of that (nothing is ever taken back, no stop-string start leaks)."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    expected = text if first < 0 else text[:first]
    s = StopStrings(stops)
    emitted = ""
    for c in chunks:
        emitted += s.push(c)
        assert expected.startswith(emitted)
        if s.stopped:
            break
    if not s.stopped:
        emitted += s.flush()
    assert emitted == expected and s.stopped == (first >= 0)
