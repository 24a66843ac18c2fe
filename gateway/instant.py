"""A minimal, fast OpenAI-compatible server that answers at once: the far end of the
gateway-overhead benchmark (bench/overhead), the remote server the openai backend's tests
talk to, and what the stand-in `vllm` executable of the tests serves. Also handy for trying
a deployment's `backend: openai` wiring without a model.

A raw ASGI app (no framework) run by uvicorn, with uvloop and httptools when installed,
so that it is never the bottleneck. It serves POST /v1/chat/completions and
/v1/completions (plain and SSE streaming), GET /health, GET /v1/models and GET /stats
(request and open-stream counts plus the last request body, for tests). The answer is
the first `max_tokens` words of a fixed text; usage counts words.

A prompt (or last chat message) that starts with `#instant` steers the reply, for tests:
  #instant status=429 retry_after=7         answer with that HTTP error
  #instant status=400 param=top_p body=text  (body=text: a non-JSON error body)
  #instant chunks=100 delay=0.05            stream slowly (counts open streams)
  #instant fail_after=2                     stream 2 chunks, then an SSE error event
  #instant drop_after=2                     stream 2 chunks, then drop the connection

With `tools` (and tool_choice not "none") it calls the tool tool_choice names, else the
first, with arguments `{"query": <the prompt>}`: whole, or streamed as OpenAI's tool-call
deltas (arguments in 3 pieces); legacy `functions` get a `function_call` the same way.

    python -m gateway.instant --port 8001 [--model instant]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

TEXT = "Hello! This is the instant server answering right away."


def _envelope(message: str, type_: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _prompt_text(body: dict) -> str:
    if "messages" in body:
        messages = body["messages"] or [{}]
        content = messages[-1].get("content") or ""
        return content if isinstance(content, str) else json.dumps(content)
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else " ".join(map(str, prompt))


def _directives(prompt: str) -> dict[str, str]:
    if not prompt.startswith("#instant"):
        return {}
    words = prompt.split("\n", 1)[0].split()[1:]
    return dict(word.split("=", 1) for word in words if "=" in word)


def _validate(body: dict, models: tuple[str, ...]) -> tuple[int, dict] | None:
    """OpenAI-style validation of the few fields a test can get wrong."""
    if body.get("model") not in models:
        message = f"The model `{body.get('model')}` does not exist."
        return 404, _envelope(message, "invalid_request_error", None, "model_not_found")
    checks = (
        ("temperature", 0.0, 2.0),
        ("top_p", 0.0, 1.0),
        ("max_tokens", 1, 1_000_000),
    )
    for name, low, high in checks:
        value = body.get(name)
        if value is not None and not (isinstance(value, int | float) and low <= value <= high):
            message = f"{name} must be between {low} and {high}; got {value!r}"
            return 400, _envelope(message, "invalid_request_error", name, "invalid_value")
    if ("messages" in body) == ("prompt" in body):
        return 400, _envelope("give exactly one of messages and prompt", "invalid_request_error")
    return None


class InstantServer:
    """The ASGI app. All state lives on the instance (no module globals)."""

    def __init__(self, model: str = "instant", text: str = TEXT, max_model_len: int = 4096):
        self.models = (model,)
        self.words = text.split()
        self.max_model_len = max_model_len
        self.requests = 0
        self.open_streams = 0
        self.streams_finished = 0
        self.streams_cancelled = 0
        self.last_request: dict | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            await self._generate(path == "/v1/chat/completions", receive, send)
        elif method == "GET" and path == "/health":
            await _send(send, 200, b"", b"text/plain")
        elif method == "GET" and path == "/v1/models":
            await _send_json(send, 200, self._model_list())
        elif method == "GET" and path == "/stats":
            await _send_json(send, 200, self._stats())
        else:
            await _send_json(send, 404, _envelope(f"no route {method} {path}", "not_found"))

    def _model_list(self) -> dict:
        entry = {"id": self.models[0], "object": "model", "created": 0, "owned_by": "instant"}
        return {"object": "list", "data": [{**entry, "max_model_len": self.max_model_len}]}

    def _stats(self) -> dict:
        return {
            "requests": self.requests,
            "open_streams": self.open_streams,
            "streams_finished": self.streams_finished,
            "streams_cancelled": self.streams_cancelled,
            "last_request": self.last_request,
        }

    async def _generate(self, chat: bool, receive, send) -> None:
        self.requests += 1
        try:
            body = json.loads(await _read_body(receive))
        except ValueError:
            await _send_json(send, 400, _envelope("body is not JSON", "invalid_request_error"))
            return
        self.last_request = body
        problem = _validate(body, self.models)
        if problem is not None:
            await _send_json(send, *problem)
            return
        prompt = _prompt_text(body)
        steer = _directives(prompt)
        if "status" in steer:
            await _send_steered_error(send, steer)
            return
        answer = _Answer(self.words, body, prompt, chat)
        if body.get("stream"):
            await self._stream(answer, steer, receive, send)
        else:
            await _send_json(send, 200, answer.whole())

    async def _stream(self, answer: _Answer, steer: dict[str, str], receive, send) -> None:
        disconnected = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, disconnected))
        self.open_streams += 1
        try:
            await _start(send, 200, b"text/event-stream")
            finished = await _stream_events(answer, steer, send, disconnected)
        finally:
            self.open_streams -= 1
            watcher.cancel()
        if finished:
            self.streams_finished += 1
        else:
            self.streams_cancelled += 1


class _Answer:
    """The fixed answer cut to max_tokens, as whole or streamed OpenAI objects."""

    def __init__(self, words: list[str], body: dict, prompt: str, chat: bool):
        limit = body.get("max_tokens") or 16
        self.words = words[:limit]
        self.finish_reason = "length" if len(words) > limit else "stop"
        self.chat = chat
        self.model = body["model"]
        self.usage = {
            "prompt_tokens": len(prompt.split()),
            "completion_tokens": len(self.words),
            "total_tokens": len(prompt.split()) + len(self.words),
        }
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        # logprobs asked for: how many alternatives per token (None: not asked for)
        asked = body.get("logprobs")
        self.top = (body.get("top_logprobs") or 0) if chat and asked else asked
        self.top = None if self.top is None or self.top is False else int(self.top)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}"
        self.created = int(time.time())
        self.call = _tool_call(body, prompt) if chat else None
        if self.call is not None:
            self.finish_reason = "function_call" if self.call["legacy"] else "tool_calls"

    def _head(self, streaming: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        if streaming and self.chat:
            kind = "chat.completion.chunk"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _choice(self, text: str, finish: str | None, streaming: bool) -> dict:
        pieces = self.pieces() if not streaming else [text] if text else []
        logprobs = _logprobs(pieces, self.top, self.chat) if self.top is not None else None
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        key = "delta" if streaming else "message"
        message = {"role": "assistant", "content": text}
        return {"index": 0, key: message, "logprobs": logprobs, "finish_reason": finish}

    def whole(self) -> dict:
        choice = self._choice(" ".join(self.words), self.finish_reason, streaming=False)
        if self.call is not None:
            choice["message"] = {"role": "assistant", "content": None, **_call_fields(self.call)}
        return {**self._head(False), "choices": [choice], "usage": self.usage}

    def call_deltas(self) -> list[dict]:
        """The tool call as stream chunks: id and name first, then the arguments in 3."""
        assert self.call is not None
        args, third = self.call["arguments"], len(self.call["arguments"]) // 3 + 1
        parts = [args[i : i + third] for i in range(0, len(args), third)]
        first = {**self.call, "arguments": ""}
        pieces = [first, *({"index": 0, "legacy": first["legacy"], "arguments": a} for a in parts)]
        out = []
        for piece in pieces:
            delta = {"role": "assistant", "content": None} if piece is first else {}
            choice = {"index": 0, "delta": {**delta, **_call_fields(piece)}, "finish_reason": None}
            out.append({**self._head(True), "choices": [choice]})
        return out

    def pieces(self) -> list[str]:
        return [w if i == 0 else " " + w for i, w in enumerate(self.words)]

    def delta(self, text: str) -> dict:
        return {**self._head(True), "choices": [self._choice(text, None, streaming=True)]}

    def last(self) -> dict:
        return {**self._head(True), "choices": [self._choice("", self.finish_reason, True)]}

    def usage_chunk(self) -> dict:
        return {**self._head(True), "choices": [], "usage": self.usage}


def _logprobs(pieces: list[str], top: int, chat: bool) -> dict | None:
    """Made-up but fixed log-probabilities: a token's is -len/10, its k-th alternative
    `alt<k>` k lower; in chat's shape (content[]) or the completions one (parallel lists)."""
    if not pieces:
        return None
    lps = [-len(p.strip()) / 10 for p in pieces]
    alts = [[(p, lp), *((f"alt{k}", lp - k) for k in range(1, top))][:top]
            for p, lp in zip(pieces, lps, strict=True)]  # fmt: skip
    if not chat:
        return {"tokens": pieces, "token_logprobs": lps,
                "top_logprobs": [dict(a) for a in alts],
                "text_offset": [sum(map(len, pieces[:i])) for i in range(len(pieces))]}  # fmt: skip
    return {"content": [
        {"token": p, "logprob": lp, "bytes": list(p.encode()),
         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in a]}
        for p, lp, a in zip(pieces, lps, alts, strict=True)]}  # fmt: skip


async def _stream_events(answer: _Answer, steer: dict[str, str], send, disconnected) -> bool:
    """Send the SSE events; False when the client went away or the stream was cut."""
    if answer.call is not None:
        for chunk in answer.call_deltas():
            await _event(send, chunk)
        return await _finish_stream(answer, send)
    pieces = answer.pieces()
    chunks = int(steer.get("chunks", len(pieces)))
    delay = float(steer.get("delay", 0))
    fail_after, drop_after = steer.get("fail_after"), steer.get("drop_after")
    for i in range(chunks):
        if fail_after is not None and i == int(fail_after):
            error = _envelope("the instant server failed mid-stream", "server_error", None, "500")
            await _event(send, error)
            await _end(send, b"data: [DONE]\n\n")
            return True
        if drop_after is not None and i == int(drop_after):
            return False  # returning without finishing the body makes uvicorn drop it
        if delay and await _wait(disconnected, delay):
            return False
        await _event(send, answer.delta(pieces[i % len(pieces)] if pieces else ""))
    return await _finish_stream(answer, send)


async def _finish_stream(answer: _Answer, send) -> bool:
    await _event(send, answer.last())
    if answer.include_usage:
        await _event(send, answer.usage_chunk())
    await _end(send, b"data: [DONE]\n\n")
    return True


def _tool_call(body: dict, prompt: str) -> dict | None:
    """The call to make for a request with tools or legacy functions, or None."""
    legacy = not body.get("tools")
    tools = [t.get("function") or {} for t in body.get("tools") or ()]
    functions = tools or list(body.get("functions") or ())
    choice = body.get("function_call" if legacy else "tool_choice")
    if not functions or choice == "none":
        return None
    named = choice.get("function", choice) if isinstance(choice, dict) else {}
    name = named.get("name") or functions[0].get("name")
    arguments = json.dumps({"query": prompt})
    return {"index": 0, "id": f"call_{uuid.uuid4().hex[:12]}", "name": name,
            "arguments": arguments, "legacy": legacy}  # fmt: skip


def _call_fields(call: dict) -> dict:
    """A (piece of a) call as a message's or delta's `tool_calls` / `function_call`."""
    function = {k: call[k] for k in ("name", "arguments") if k in call}
    if call["legacy"]:
        return {"function_call": function}
    entry: dict = {"index": call["index"], "function": function}
    if "id" in call:
        entry.update(id=call["id"], type="function")
    return {"tool_calls": [entry]}


async def _wait(event: asyncio.Event, delay: float) -> bool:
    """Sleep `delay` seconds; True when `event` was set meanwhile."""
    try:
        await asyncio.wait_for(event.wait(), delay)
    except TimeoutError:
        return False
    return True


async def _watch_disconnect(receive, disconnected: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    disconnected.set()


async def _send_steered_error(send, steer: dict[str, str]) -> None:
    status = int(steer["status"])
    headers = [(b"retry-after", steer["retry_after"].encode())] if "retry_after" in steer else []
    if steer.get("body") == "text":
        await _send(send, status, b"upstream exploded", b"text/plain", headers)
        return
    error = _envelope(
        steer.get("message", f"steered error {status}"),
        steer.get("type", "invalid_request_error" if status < 500 else "server_error"),
        steer.get("param"),
        steer.get("code"),
    )
    await _send(send, status, json.dumps(error).encode(), b"application/json", headers)


async def _read_body(receive) -> bytes:
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body"):
        return body
    parts = [body]
    while message.get("more_body"):
        message = await receive()
        parts.append(message.get("body", b""))
    return b"".join(parts)


async def _start(send, status: int, content_type: bytes, extra=()) -> None:
    headers = [(b"content-type", content_type), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def _send(send, status: int, body: bytes, content_type: bytes, extra=()) -> None:
    length = [(b"content-length", str(len(body)).encode())]
    await _start(send, status, content_type, [*length, *extra])
    await send({"type": "http.response.body", "body": body})


async def _send_json(send, status: int, obj: dict) -> None:
    await _send(send, status, json.dumps(obj).encode(), b"application/json")


async def _event(send, obj: dict) -> None:
    data = b"data: " + json.dumps(obj).encode() + b"\n\n"
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _end(send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": False})


def serve(host: str, port: int, model: str = "instant", max_model_len: int = 4096) -> None:
    """Run the server in this process until interrupted."""
    import uvicorn

    app = InstantServer(model=model, max_model_len=max_model_len)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", default="instant")
    parser.add_argument("--max-model-len", type=int, default=4096)
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.model, args.max_model_len)


if __name__ == "__main__":
    main()
