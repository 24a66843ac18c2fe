"""The floor of the 429 path: a bare ASGI app under uvicorn (the gateway's server, with
the same uvloop and httptools) that answers every request but GET /health with the
gateway's 429 body.
No Python ASGI gateway on the same machine refuses a burst faster than this.

    python -m uvicorn bench.overload.floor:app --port 8009
"""

from __future__ import annotations

from gateway.admission import refusal

_REFUSAL = refusal(64)
_OK = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]}


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/health":
        await send(_OK)
        await send({"type": "http.response.body", "body": b""})
        return
    await send(_REFUSAL.start)
    await send(_REFUSAL.body)
