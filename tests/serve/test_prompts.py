"""What the model receives: one BOS, never two (vLLM #5278), on both routes, with a tokenizer that adds a BOS itself
and a chat template that writes one too."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import processors
from transformers import AutoTokenizer

from moekit.serve import protocol as P
from moekit.serve.app import ServerState, _chat_ids, _encode
from moekit.serve.metrics import ServerMetrics

DEMO = Path(__file__).resolve().parents[2] / "demo" / "model"


@pytest.fixture(scope="module")
def state():
    tok = AutoTokenizer.from_pretrained(DEMO)
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, bos)])  # like Llama / Mixtral tokenizers
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert tok("hi").input_ids[0] == bos
    return ServerState("m", "m", 1024, tok, ServerMetrics("m", 1024))


def test_chat_has_one_bos(state):
    bos = state.tokenizer.bos_token_id
    ids = _chat_ids(state, [P.Message(role="user", content="hello")], True)
    assert ids[0] == bos and ids.count(bos) == 1
    naive = state.tokenizer(state.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}],
                                                                tokenize=False)).input_ids
    assert naive[:2] == [bos, bos]  # what tokenising the rendered template again would have sent


def test_completion_has_one_bos(state):
    ids = _encode(state, "hello", True)
    assert ids.count(state.tokenizer.bos_token_id) == 1 and ids[0] == state.tokenizer.bos_token_id


def test_no_template_is_a_400(state):
    import copy

    bare = copy.copy(state)
    bare.tokenizer = copy.deepcopy(state.tokenizer)
    bare.tokenizer.chat_template = None
    with pytest.raises(P.ApiError) as err:
        _chat_ids(bare, [P.Message(role="user", content="x")], True)
    assert err.value.status == 400 and "no chat template" in err.value.message
