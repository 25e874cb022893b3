"""OpenAI-compatible HTTP server on the runtime (`moekit serve`): FastAPI + uvicorn in one process, continuous batching
over the (offloaded) experts on an engine thread. docs/serving.md.

    server.py     serve(MODEL, RuntimeOptions, ServeOptions): checks, binds, loads on a thread, runs uvicorn
    app.py        the routes, errors, streaming, cancellation
    protocol.py   request bodies, field by field (400 for anything not honoured)
    scheduler.py  the engine: admission, chunked prefill, one forward per step, sampling, stops
    attention.py  ragged attention: one packed forward, a KV cache per sequence
    text.py       incremental UTF-8-safe detokenisation, stop-string hold-back
    metrics.py    /metrics: vLLM's request metrics and the expert cache
"""
