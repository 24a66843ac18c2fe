"""The openai backend's own cost: OpenAIHTTPBackend against the client it is built on
(httpx.AsyncClient over httpx_aiohttp's AiohttpTransport) and against a plain
httpx.AsyncClient (httpcore), all POSTing the same chat completion to the instant server,
one request at a time and 32 at once, in this process (uvloop when installed).

    .venv/bin/python -m bench.overhead.client [--requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable

import httpx
from httpx_aiohttp import AiohttpTransport

from bench.overhead.run import INSTANT, process
from models.backends.base import GenerationRequest, SamplingParams
from models.backends.openai_http import OpenAIHTTPBackend

MESSAGES = ({"role": "user", "content": "Say hello."},)


async def timed(call: Callable[[], Awaitable[object]], n: int, concurrency: int) -> dict:
    latencies: list[float] = []

    async def worker(count: int) -> None:
        for _ in range(count):
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    for _ in range(100):
        await call()
    start = time.perf_counter()
    await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {
        "p50_us": round(statistics.median(latencies) * 1e6),
        "rps": round(len(latencies) / elapsed),
    }


async def compare(url: str, n: int) -> dict:
    backend = OpenAIHTTPBackend("instant", url)
    await backend.start()
    request = GenerationRequest("b", SamplingParams(max_tokens=16), messages=MESSAGES, stream=False)

    async def via_backend() -> None:
        async for _ in backend.generate(request):
            pass

    body = json.dumps({"model": "instant", "messages": list(MESSAGES), "max_tokens": 16})
    headers = {"content-type": "application/json"}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    plain = httpx.AsyncClient(base_url=url, headers=headers, limits=limits)
    aio = httpx.AsyncClient(
        base_url=url, headers=headers, transport=AiohttpTransport(limits=limits)
    )

    def via(client: httpx.AsyncClient) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            (await client.post("/v1/chat/completions", content=body)).json()

        return call

    calls = {"openai_http": via_backend, "httpx+aiohttp": via(aio), "httpx": via(plain)}
    results = {}
    for name, call in calls.items():
        for c in (1, 32):
            results[f"{name} c={c}"] = await timed(call, n, c)
    await backend.stop()
    await aio.aclose()
    await plain.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--port", type=int, default=8102)
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    server = [*INSTANT, "--port", str(args.port)]
    with process("instant server", server, f"{url}/health", 30):
        try:
            import uvloop

            results = uvloop.run(compare(url, args.requests))
        except ImportError:
            results = asyncio.run(compare(url, args.requests))
    for key, row in results.items():
        print(f"{key:20} p50 {row['p50_us']:>6} us {row['rps']:>7} req/s")


if __name__ == "__main__":
    main()
