"""`serve(MODEL, RuntimeOptions, ServeOptions)`: check, bind, answer /health at once, load, then serve.

Order: the cheap checks (options, the model's config and tokenizer, the address) run before anything heavy and fail
in one line; the socket is bound here (so a busy port is one clear error, and --port 0 picks a free one); uvicorn
then serves on it while the store build and weight load run on a thread (/health answers 503 until they are done);
the engine thread starts last. One process, one model.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from moekit.errors import UserError
from moekit.serve.app import Limits, ServerState, create_app
from moekit.serve.metrics import ServerMetrics
from moekit.serve.scheduler import Engine, EngineConfig

log = logging.getLogger("moekit.serve")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    served_name: str | None = None  # None: the model folder's name
    api_key: str | None = None
    allow_no_api_key: bool = False  # bind a non-loopback address without a key (refused otherwise)
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: Limits = field(default_factory=Limits)
    max_model_len: int | None = None  # None: the model's (max_position_embeddings, capped by the tokenizer's)

    def __post_init__(self):
        if not (0 <= self.port <= 65535):
            raise UserError(f"--port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("--api-key is empty: give a key, or leave the option out")
        if self.served_name is not None and not self.served_name.strip():  # clients send it as `model`
            raise UserError("--served-name is empty: give the name clients use, or leave it out (the folder's name)")
        if not self.is_loopback() and self.api_key is None and not self.allow_no_api_key:
            raise UserError(f"--host {self.host} exposes the server beyond this machine without an API key: pass "
                            f"--api-key KEY (or set MOEKIT_API_KEY), or --allow-no-api-key if that is intended")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise UserError(f"--max-model-len must be >= 2, got {self.max_model_len}")
        if self.limits.max_body_bytes < 1024:
            raise UserError(f"--max-body-bytes must be >= 1024, got {self.limits.max_body_bytes}")

    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def bind(host: str, port: int) -> socket.socket:
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise UserError(f"cannot resolve --host {host!r} ({err.strerror})") from None
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}): choose another --port "
                        f"(--port 0 picks a free one)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def sampling_defaults(model: Path) -> dict:
    """The model's own sampling defaults (generation_config.json with do_sample), as vLLM applies them; {} if none.
    A file that is not JSON, or whose values no request could use, is one line before the server starts."""
    from moekit.runtime.sampling import SamplingParams

    path = model / "generation_config.json"
    if not path.is_file():
        return {}
    fix = "restore the checkpoint's original file, or delete it"
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: not valid JSON ({err}); {fix}") from None
    if not isinstance(cfg, dict) or not cfg.get("do_sample"):
        return {}
    values = {k: cfg[k] for k in ("temperature", "top_p", "top_k") if cfg.get(k) is not None}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (key == "top_k" and value != int(value)):
            raise UserError(f"{path}: {key} {value!r} is not a number; {fix}")
    try:
        SamplingParams(**values)
    except UserError as err:
        raise UserError(f"{path}: {err}; {fix}") from None
    return values


def context_length(skeleton, tokenizer, cap: int | None) -> int:
    config = skeleton.model.config.get_text_config()
    n = getattr(config, "max_position_embeddings", None) or 2048
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 10**8:
        n = min(n, tok_max)
    return min(n, cap) if cap is not None else n


def serve(model, runtime, options: ServeOptions, *, announce=print) -> None:
    """Serve `model` until interrupted. `runtime`: moekit.runtime.RuntimeOptions. announce(line): startup lines."""
    import uvicorn

    from moekit.runtime.session import check_offloaded

    model = Path(model)
    checked = check_offloaded(model, runtime)  # every check before a weight is read or the port bound: one line each
    tokenizer = checked.tokenizer
    max_len = context_length(checked.skeleton, tokenizer, options.max_model_len)
    defaults = sampling_defaults(model)
    name = options.served_name or model.resolve().name
    sock = bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    state = ServerState(served_name=name, root=str(model), max_model_len=max_len, tokenizer=tokenizer,
                        metrics=ServerMetrics(name, max_len), api_key=options.api_key, limits=options.limits,
                        sampling_defaults=defaults)
    config = uvicorn.Config(create_app(state), log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                            limit_concurrency=max(256, 2 * (options.engine.max_queue + options.engine.max_batch)))
    server = uvicorn.Server(config)
    url_host = f"[{host}]" if ":" in host else host
    announce(f"moekit serve: {name} on http://{url_host}:{port} (loading; /health answers 503 until ready)")
    loader = threading.Thread(target=_load, args=(model, runtime, checked, tokenizer, max_len, options, state,
                                                  server, announce), name="moekit-load", daemon=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        if state.engine is not None:
            state.engine.stop()
            state.offloaded.close()
        sock.close()
    if state.load_error is not None:
        raise UserError(state.load_error)


def _load(model, runtime, checked, tokenizer, max_len, options, state, server, announce) -> None:
    from moekit.runtime.session import open_offloaded

    try:
        om = open_offloaded(model, runtime, checked=checked, tokenizer=False)
        om.tokenizer = tokenizer
        eos = _eos_ids(om.model, tokenizer)
        engine = Engine(om.model, tokenizer, options.engine, max_len=max_len, eos_ids=eos, hooks=state.metrics,
                        routing_hooks=om.routing_hooks)
        state.metrics.attach(engine, om)
        engine.start()
        state.offloaded, state.engine = om, engine  # the engine last: /health turns 200 with it
        experts = (f"{om.capacity} experts per MoE layer cached, budget {om.budget} bytes" if om.layers
                   else "every expert in memory")
        announce(f"moekit serve: ready ({experts}; batch {options.engine.max_batch}, queue "
                 f"{options.engine.max_queue}, context {max_len} tokens; continuous batching "
                 f"{'over one packed forward' if engine.batched else 'one sequence per forward'})")
    except UserError as err:
        state.load_error = str(err)
        server.should_exit = True
    except Exception as err:  # pragma: no cover - unexpected: say it and stop serving
        log.exception("loading failed")
        state.load_error = f"loading {model} failed: {type(err).__name__}: {err}"
        server.should_exit = True
    sys.stdout.flush()


def _eos_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids: the generation config's (one id or a list), else the tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])
