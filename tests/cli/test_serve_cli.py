"""`moekit serve` bad input: one line, exit 2, before anything is loaded or bound."""

from __future__ import annotations

import socket

import pytest

from tests.helpers import run_cli

DEMO = "demo/model"


@pytest.mark.parametrize("args, words", [
    (["--host", "0.0.0.0"], "without an API key"),
    (["--host", "192.168.1.10", "--api-key", ""], "--api-key is empty"),
    (["--port", "70000"], "--port"),
    (["--max-batch", "0"], "--max-batch"),
    (["--max-batch", "8", "--max-step-tokens", "4"], "--max-step-tokens"),
    (["--max-model-len", "1"], "--max-model-len"),
    (["--budget", "lots"], "cannot read the size"),
    (["--policy", "nope"], "cache policy"),
    (["--policy", "belady"], "offline oracle"),
    (["--max-body-bytes", "10"], "--max-body-bytes"),
])
def test_bad_options(args, words, capsys):
    code, out, err = run_cli(["serve", DEMO, *args], capsys)
    assert code == 2 and err.startswith("error:") and words in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_missing_model_and_busy_port(capsys, tmp_path):
    code, _, err = run_cli(["serve", str(tmp_path / "nope")], capsys)
    assert code == 2 and "no model at" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        code, _, err = run_cli(["serve", DEMO, "--port", str(busy.getsockname()[1])], capsys)
    assert code == 2 and "cannot listen on 127.0.0.1" in err and "--port" in err
