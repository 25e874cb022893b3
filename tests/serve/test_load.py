"""Bounded load on loopback: 64 concurrent streaming clients against --max-batch 4 and --max-queue 8."""

from __future__ import annotations

import asyncio
import json
import time

import httpx2 as httpx  # the HTTP client the openai package itself uses (its dependency)

from tests.serve.conftest import KEY, MAX_BATCH, MAX_QUEUE

CLIENTS = 64
RSS_GROWTH_BOUND = 64 << 20  # the load may add at most 64 MiB to the server's resident memory
RSS_BOUND = 1536 << 20  # and the server stays under 1.5 GiB in all (the demo model, its store reads, Python)


async def one(client: httpx.AsyncClient, url: str, i: int) -> dict:
    body = {"prompt": f"Item {i}:", "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "headers": dict(r.headers), "body": json.loads(await r.aread())}
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    return {"status": 200, "events": [x[6:] if x[6:] == "[DONE]" else json.loads(x[6:]) for x in lines]}


async def storm(url: str) -> list[dict]:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=120, limits=limits) as client:
        return await asyncio.wait_for(asyncio.gather(*(one(client, url, i) for i in range(CLIENTS))), 300)


def well_formed(events: list) -> bool:
    *chunks, done = events
    finishes = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is not None]
    usage = chunks[-1]
    return (done == "[DONE]" and len(finishes) == 1 and usage["choices"] == []
            and usage["usage"]["completion_tokens"] >= 1
            and all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks))


def test_64_streams_against_a_small_queue(server):
    rss0 = server.rss_bytes()
    t0 = time.monotonic()
    results = asyncio.run(storm(server.url))
    accepted = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] != 200]
    assert len(accepted) >= MAX_BATCH and refused, (len(accepted), len(refused))
    assert len(accepted) <= CLIENTS and all(well_formed(r["events"]) for r in accepted)
    for r in refused:
        assert r["status"] == 503 and int(r["headers"]["retry-after"]) >= 1
        assert r["body"]["error"]["code"] == "queue_full"
    rss1 = server.rss_bytes()
    assert rss1 - rss0 <= RSS_GROWTH_BOUND and rss1 <= RSS_BOUND, (rss0, rss1)
    # it survives: answers, nothing left running or waiting, the refusals are counted
    assert httpx.get(server.url + "/health").status_code == 200
    m = server.metrics()
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
    assert m["moekit:requests_rejected_total"] >= len(refused)
    r = server.post("/v1/completions", {"prompt": "after", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert time.monotonic() - t0 < 120
    assert MAX_QUEUE < CLIENTS
