"""The FastAPI app: OpenAI's routes on the continuous-batching engine, plus /health, /tokenize, /detokenize, /metrics.

The event loop never blocks: tokenisation runs in a worker thread, the engine on its own (scheduler.py), and results
come back through an asyncio.Queue per request filled with call_soon_threadsafe. Each request has a watcher that waits
for the client's http.disconnect and aborts the request in the engine, queued or running, and only that request
(vLLM's `with_cancellation`: nothing else notices a gone client of a non-streamed request, and Starlette's streaming
response under ASGI spec >= 2.4 notices only when a write fails, which never happens while a request is queued).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from moekit.errors import UserError
from moekit.runtime.sampling import SamplingParams
from moekit.serve import protocol as P
from moekit.serve.metrics import ServerMetrics
from moekit.serve.scheduler import Event, QueueFull, SequenceSpec
from moekit.serve.text import token_bytes

log = logging.getLogger("moekit.serve")
PING_S = 15.0  # an SSE comment after this long without output (a long prefill or queue wait): proxies keep the stream


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # None: max_model_len - 1
    retry_after_s: int = 1


@dataclass
class ServerState:
    """What the routes share. `engine` is None while the model loads (/health answers 503 until it is set)."""

    served_name: str
    root: str
    max_model_len: int
    tokenizer: object
    metrics: ServerMetrics
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    sampling_defaults: dict = field(default_factory=dict)  # from the model's generation_config.json
    engine: object = None
    offloaded: object = None  # the OffloadedModel (moekit.runtime), closed at shutdown
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="moekit serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(P.ApiError)
    async def _api_error(request, err: P.ApiError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, err):  # FastAPI's 422 is not OpenAI's: bad parameters are 400
        return JSONResponse(P.bad_request(str(err.errors()[0].get("msg", err))).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, err):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(P.ApiError(err.status_code, str(err.detail), type=kind).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, err):
        log.exception("request failed")
        return JSONResponse(P.ApiError(500, f"internal error: {type(err).__name__}", type="server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        if state.engine is None:
            msg = f"failed to load: {state.load_error}" if state.load_error else "loading model"
            return JSONResponse(P.ApiError(503, msg, type="unavailable_error").body(), status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(state, request)
        return {"object": "list", "data": [{"id": state.served_name, "object": "model", "created": state.created,
                                            "owned_by": "moekit", "root": state.root, "parent": None,
                                            "max_model_len": state.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = P.parse(P.TokenizeRequest, await _json(state, request))
        _check_model(state, body.model)
        if body.messages is not None:
            ids = await asyncio.to_thread(_chat_ids, state, body.messages, body.add_generation_prompt)
        else:
            ids = await asyncio.to_thread(_encode, state, body.prompt, body.add_special_tokens)
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = P.parse(P.DetokenizeRequest, await _json(state, request))
        _check_model(state, body.model)
        vocab = len(state.tokenizer)
        if any(t >= vocab for t in body.tokens):
            raise P.bad_request(f"token ids must be < {vocab}", "tokens")
        return {"prompt": await asyncio.to_thread(state.tokenizer.decode, body.tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = P.parse(P.CompletionRequest, await _json(state, request))
        _check_model(state, body.model)
        prompts = await asyncio.to_thread(lambda: [_encode(state, p, True) if isinstance(p, str) else list(p)
                                                   for p in body.prompts()])
        return await _generate(state, request, body, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = P.parse(P.ChatCompletionRequest, await _json(state, request))
        _check_model(state, body.model)
        ids = await asyncio.to_thread(_chat_ids, state, body.messages, True)
        return await _generate(state, request, body, [ids], chat=True)

    return app


# request plumbing ------------------------------------------------------------------------------------------------
def _authorize(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(given.encode(), state.api_key.encode()):
        raise P.ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY", type="authentication_error",
                         code="invalid_api_key")


async def _json(state: ServerState, request: Request):
    """Authorise, refuse while loading, read at most --max-body-bytes (413 past it), decode JSON (400)."""
    _authorize(state, request)
    if state.engine is None:
        raise P.ApiError(503, "the model is still loading", type="unavailable_error",
                         headers={"Retry-After": str(state.limits.retry_after_s)})
    limit = state.limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise P.ApiError(413, f"request body of {declared} bytes is over the limit of {limit}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise P.ApiError(413, f"request body is over the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as err:
        raise P.bad_request(f"the body is not valid JSON ({err})") from None


def _check_model(state: ServerState, name: str | None) -> None:
    """A request names a model only to say which one it wants; it never makes the server open anything."""
    if name is not None and name != state.served_name:
        raise P.ApiError(404, f"the model {name!r} does not exist: this server serves {state.served_name!r}",
                         param="model", code="model_not_found", type="invalid_request_error")


def _encode(state: ServerState, text: str, special: bool) -> list[int]:
    return state.tokenizer(text, add_special_tokens=special).input_ids


def _chat_ids(state: ServerState, messages: list[P.Message], generation_prompt: bool) -> list[int]:
    """The chat template tokenised in one go (tokenize=True: the template's BOS is the only one, no double BOS)."""
    tok = state.tokenizer
    if not getattr(tok, "chat_template", None):
        raise P.bad_request(f"{state.served_name} has no chat template: use /v1/completions", "messages")
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    try:
        return list(tok.apply_chat_template(conversation, add_generation_prompt=generation_prompt, tokenize=True,
                                            return_dict=False))
    except Exception as err:  # a template that refuses the conversation (roles out of order, ...)
        raise P.bad_request(f"the chat template refused the messages: {err}", "messages") from None


def _sampling(state: ServerState, body, top: int | None) -> SamplingParams:
    """The request's sampling fields; a field left out takes the model's default, then OpenAI's."""
    def pick(name: str, fallback):
        value = getattr(body, name)
        return value if value is not None else state.sampling_defaults.get(name, fallback)

    try:
        return SamplingParams(temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
                              top_k=pick("top_k", 0), seed=body.seed, logprobs=top)
    except UserError as err:
        raise P.bad_request(str(err)) from None


def _specs(state: ServerState, body, prompts: list[list[int]], chat: bool) -> list[SequenceSpec]:
    """One SequenceSpec per (prompt, choice), after the limits: a prompt over the context is a 413, a prompt plus
    max_tokens over it a 400; max_tokens left out means the rest of the context."""
    context = min(state.max_model_len, state.engine.config.max_kv_tokens)  # a sequence never holds more KV
    limit = min(state.limits.max_prompt_tokens or context - 1, context - 1)
    vocab = len(state.tokenizer)
    params = _sampling(state, body, body.top if chat else body.logprobs)
    routing = _routing(state, body)
    max_tokens = body.limit if chat else body.max_tokens
    specs = []
    for i, ids in enumerate(prompts):
        if not ids:
            raise P.bad_request("the prompt is empty", "prompt")
        if len(ids) > limit:
            raise P.ApiError(413, f"the prompt has {len(ids)} tokens, over the limit of {limit}", param="prompt",
                             code="context_length_exceeded")
        if any(t < 0 or t >= vocab for t in ids):
            raise P.bad_request(f"token ids must be in [0, {vocab})", "prompt")
        n_out = max_tokens if max_tokens is not None else context - len(ids)
        if len(ids) + n_out > context:
            raise P.bad_request(f"the context is {context} tokens; the prompt has {len(ids)} and max_tokens asks "
                                f"for {n_out}: lower max_tokens", "max_tokens")
        text = state.tokenizer.decode(ids) if routing is not None and routing.needs_prompt() else ""
        for j in range(body.n):
            specs.append(SequenceSpec(ids, n_out, params, list(body.stop or []), frozenset(body.stop_token_ids or ()),
                                      index=i * body.n + j, choice=j,
                                      routing=None if routing is None else routing.for_prompt(text)))
    return specs


def _routing(state: ServerState, body):
    """The request's routing: its own `routing` field (checked against the model: a 400 naming the problem), else
    the server's --routing. Each choice gets a fresh copy (replay cursors, C3PO's prompt-derived weights)."""
    from moekit.routing import parse_request

    om = state.offloaded
    if body.routing is None:
        return om.routing_policy
    try:
        routing = parse_request(body.routing)
        return None if routing is None else routing.bind(om.view)
    except UserError as err:
        raise P.bad_request(str(err), "routing") from None


class _Stream:
    """One request's results from the engine thread, in order, on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, choices: int):
        self.queue: asyncio.Queue[list[Event] | None] = asyncio.Queue()
        self.loop = loop
        self.open = set(range(choices))

    def sink(self, events: list[Event]) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, events)

    def close(self) -> None:
        """The client is gone: end `events` (the engine sends nothing more for an aborted request)."""
        self.queue.put_nowait(None)

    async def events(self):
        while self.open:
            try:
                batch = await asyncio.wait_for(self.queue.get(), PING_S)
            except TimeoutError:
                yield None  # nothing for a while: the caller may ping
                continue
            if batch is None:
                return
            for ev in batch:
                if ev.finish_reason is not None:
                    self.open.discard(ev.index)
                yield ev


async def _watch_disconnect(request: Request, on_gone) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            on_gone()
            return


async def _generate(state: ServerState, request: Request, body, prompts, chat: bool):
    specs = _specs(state, body, prompts, chat)
    engine = state.engine
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
    stream = _Stream(asyncio.get_running_loop(), len(specs))
    try:
        engine.submit(rid, specs, stream.sink)
    except QueueFull as err:
        state.metrics.rejected.inc()
        raise P.ApiError(503, f"the server is busy ({err}): retry later", type="server_error", code="queue_full",
                         headers={"Retry-After": str(state.limits.retry_after_s)}) from None
    except ValueError as err:
        raise P.bad_request(str(err), "max_tokens") from None

    def gone():
        engine.abort(rid)
        stream.close()

    watcher = asyncio.create_task(_watch_disconnect(request, gone))
    fmt = _Format(state, rid, chat, body, specs, prompts)
    if body.stream:
        return StreamingResponse(_sse(engine, rid, stream, fmt, watcher), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        async for ev in stream.events():
            if ev is not None:
                fmt.add(ev)
    finally:
        watcher.cancel()
        if stream.open:
            engine.abort(rid)
    if fmt.error:
        raise P.ApiError(500, "generation failed in the engine (see the server log)", type="server_error")
    if stream.open:  # the client left: nobody reads this response
        return Response(status_code=499)
    return fmt.response()


async def _sse(engine, rid: str, stream: _Stream, fmt, watcher):
    def data(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"

    try:
        for chunk in fmt.opening():
            yield data(chunk)
        async for ev in stream.events():
            if ev is None:
                yield ": ping\n\n"
                continue
            for chunk in fmt.chunks(ev):
                yield data(chunk)
        if fmt.error:
            yield data(P.ApiError(500, "generation failed in the engine (see the server log)",
                                  type="server_error").body())
        elif fmt.include_usage:
            yield data(fmt.usage_chunk())
        yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        if stream.open:  # the client left (or the response was cancelled): stop generating for it
            engine.abort(rid)


class _Format:
    """OpenAI's response and chunk shapes for one request (chat.completion / text_completion)."""

    def __init__(self, state: ServerState, rid: str, chat: bool, body, specs, prompts):
        self.state, self.rid, self.chat = state, rid, chat
        self.n = len(specs)
        self.created = int(time.time())
        self.text = [""] * self.n
        self.finish: list[str | None] = [None] * self.n
        self.tokens = [0] * self.n
        self.logprobs: list[list] = [[] for _ in range(self.n)]
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.include_usage = body.include_usage
        self.error = False
        self.want_logprobs = (body.top if chat else body.logprobs) is not None
        self._offset = [0] * self.n

    # non-streaming ----------------------------------------------------------------------------------------------
    def add(self, ev: Event) -> None:
        i = ev.index
        self.text[i] += ev.text
        self.logprobs[i] += ev.logprobs
        if ev.finish_reason is not None:
            self.finish[i], self.tokens[i] = ev.finish_reason, ev.completion_tokens
            self.error |= ev.finish_reason == "error"

    def usage(self) -> dict:
        done = sum(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    def response(self) -> dict:
        choices = []
        for i in range(self.n):
            lp = self._logprobs(self.logprobs[i], i) if self.want_logprobs else None
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": self.text[i]},
                                "logprobs": lp, "finish_reason": self.finish[i]})
            else:
                choices.append({"index": i, "text": self.text[i], "logprobs": lp, "finish_reason": self.finish[i]})
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.state.served_name, "choices": choices, "usage": self.usage()}

    # streaming -----------------------------------------------------------------------------------------------------
    def _chunk(self, choices: list[dict]) -> dict:
        out = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.state.served_name, "choices": choices}
        if self.include_usage:
            out["usage"] = None  # OpenAI: null on every chunk but the last, which carries it with choices: []
        return out

    def opening(self) -> list[dict]:
        if not self.chat:
            return []
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(self.n)]

    def chunks(self, ev: Event) -> list[dict]:
        i, out = ev.index, []
        if ev.finish_reason is not None:
            self.tokens[i] = ev.completion_tokens
            self.error |= ev.finish_reason == "error"
        if ev.text or ev.logprobs:
            lp = self._logprobs(ev.logprobs, i) if self.want_logprobs and ev.logprobs else None
            if self.chat:
                out.append(self._chunk([{"index": i, "delta": {"content": ev.text}, "logprobs": lp,
                                         "finish_reason": None}]))
            else:
                out.append(self._chunk([{"index": i, "text": ev.text, "logprobs": lp, "finish_reason": None}]))
        if ev.finish_reason is not None and ev.finish_reason != "error":
            end = {"index": i, "delta": {}} if self.chat else {"index": i, "text": ""}
            out.append(self._chunk([{**end, "logprobs": None, "finish_reason": ev.finish_reason}]))
        return out

    def usage_chunk(self) -> dict:
        return {**self._chunk([]), "usage": self.usage()}

    # log-probabilities ---------------------------------------------------------------------------------------------
    def _logprobs(self, entries, i: int):
        tok = self.state.tokenizer
        piece = lambda t: tok.decode([t])  # noqa: E731
        if self.chat:
            def one(t, v):
                return {"token": piece(t), "logprob": v, "bytes": list(token_bytes(tok, t))}

            return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]}
                                for e in entries]}
        tokens = [piece(e.token) for e in entries]
        offsets = []
        for s in tokens:
            offsets.append(self._offset[i])
            self._offset[i] += len(s)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{piece(t): v for t, v in e.top} for e in entries], "text_offset": offsets}

