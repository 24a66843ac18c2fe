"""In-process transformers backend with continuous batching (CPU by default, CUDA if present).

One worker thread owns the model. Each iteration it admits waiting requests up to
`max_batch_size`, prefills the newcomers, and runs one decode step for every running
sequence at once over a shared left-padded KV cache (`kvcache.KVBatch`); sequences leave
the batch as soon as they finish or their consumer goes away. An exception in a step
fails only the requests of that step's batch and the worker goes on. Tokenisation runs
on a one-thread executor and results cross back to the event loop with
`call_soon_threadsafe` into one asyncio.Queue per request, so the loop never waits on
torch or the tokenizer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from models.backends.base import (
    BackendError,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    InvalidParams,
    Load,
    ModelCard,
    Overloaded,
    PromptTooLong,
    Role,
    Unavailable,
)
from models.backends.constrained import Constraints
from models.backends.decoding import (
    IncrementalDetokenizer,
    LogitsAdjuster,
    TextState,
    TokenChooser,
    check_logit_bias,
    eos_token_ids,
    make_generator,
    token_texts,
)
from models.backends.kvcache import KVBatch, check_model

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Structured outputs by constrained decoding (constrained.py); tools need a tool parser.
SUPPORTS = frozenset({"json_object", "json_schema"})


def set_threads(n: int | None) -> None:
    """Set torch's intra-op threads for the whole process: `torch.set_num_threads` is
    process-wide, so the gateway calls this once at start, before any local model's worker
    thread exists. None means every core this process may run on. A later call with
    another value applies it (the last call wins) and logs the change; worker threads
    already running may keep the old count, so call it before starting models."""
    if n is not None and n < 1:
        raise ValueError(f"threads must be >= 1 or None (all cores), got {n}")
    if n is None:  # the cores this process may run on (affinity is Linux-only)
        affinity = getattr(os, "sched_getaffinity", None)
        n = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
    current = torch.get_num_threads()
    if n != current:
        log.info("torch intra-op threads: %d -> %d (process-wide)", current, n)
        torch.set_num_threads(n)


@dataclass(eq=False)
class _Sequence:
    """One request's state, shared by its generator (event loop) and the worker thread."""

    request: GenerationRequest
    prompt_ids: list[int]
    text: TextState
    chooser: TokenChooser
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[GenerationChunk | BaseException] = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the event loop, read by the worker
    done: bool = False  # set by the worker once the final chunk or an error is sent
    last_token: int = -1
    batch_size: int = 0

    def deliver(self, item: GenerationChunk | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            self.cancelled = True

    def fail(self, exc: BaseException) -> None:
        if not self.done:
            self.done = True
            self.deliver(exc)


@dataclass
class _Loaded:
    """What `start` builds: the model, its tokenizers and the facts the card reports."""

    model: Any
    tokenizer: Any  # encodes, used only by the tokenising thread
    detokenizer: Any  # a second instance, used only by the worker thread
    eos_ids: frozenset[int]
    vocab_size: int  # the width of the model's logits
    device: str
    context_length: int
    parameters: int
    non_embedding_parameters: int
    created: int
    constraints: Constraints  # uses `tokenizer`: only on the tokenising thread


class LocalBackend:
    """A Hugging Face causal LM served from this process; see the module docstring."""

    def __init__(
        self,
        name: str,
        path: Path,
        *,
        role: Role = "teacher",
        device: str = "auto",
        dtype: str = "float32",
        max_batch_size: int = 8,
        queue_size: int = 64,
        context_length: int | None = None,
        parent: str | None = None,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if max_batch_size < 1 or queue_size < 0:
            raise ValueError(
                f"max_batch_size must be >= 1 and queue_size >= 0, "
                f"got {max_batch_size} and {queue_size}"
            )
        self.name = name
        self.path = Path(path)
        self.role: Role = role
        self.device = device
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.queue_size = queue_size
        self.context_length = context_length
        self.parent = parent
        self._loaded: _Loaded | None = None
        self._thread: threading.Thread | None = None
        self._tokenize: ThreadPoolExecutor | None = None
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._accepting = False
        self._stopping = False
        self._rows: list[_Sequence] = []  # worker-owned; row i of self._batch
        self._batch: KVBatch | None = None

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Load the tokenizer and model off the event loop, then start the worker. Threads:
        see `set_threads`, which the gateway calls once for every model of the process."""
        if self._thread is not None:
            return
        self._loaded = await asyncio.to_thread(self._load)
        # One thread, so the tokenizer is never used by two threads at once.
        self._tokenize = ThreadPoolExecutor(1, thread_name_prefix=f"distillgate-tok-{self.name}")
        with self._cond:
            self._accepting, self._stopping = True, False
        self._thread = threading.Thread(
            target=self._worker, name=f"distillgate-local-{self.name}", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        """Stop the worker; every waiting or running request fails with Unavailable."""
        with self._cond:
            self._accepting, self._stopping = False, True
            self._cond.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join)
        executor, self._tokenize = self._tokenize, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown)
        self._loaded = None

    def _load(self) -> _Loaded:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            self.path, dtype=_DTYPES[self.dtype], local_files_only=True
        )
        model.to(device).eval()
        check_model(model)
        total, non_embedding = _count_parameters(model)
        eos_ids = eos_token_ids(model.config, model.generation_config, tokenizer)
        return _Loaded(
            model=model,
            tokenizer=tokenizer,
            detokenizer=AutoTokenizer.from_pretrained(self.path, local_files_only=True),
            eos_ids=eos_ids,
            vocab_size=int(model.config.vocab_size),
            device=device,
            context_length=self.context_length or model.config.max_position_embeddings,
            parameters=total,
            non_embedding_parameters=non_embedding,
            created=int(time.time()),
            constraints=Constraints(tokenizer, int(model.config.vocab_size), eos_ids),
        )

    # -- the Backend protocol --------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the completion of `request`; the last chunk carries the counts.

        completion_tokens counts every sampled token up to the stop point, an ending EOS
        token included (as OpenAI and vLLM count it), though EOS adds no text. Leaving
        the iteration early cancels the request and frees its batch slot.
        """
        seq = await self._submit(request)
        try:
            while True:
                item = await seq.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not seq.done:
                self._cancel(seq)

    async def health(self) -> bool:
        thread = self._thread
        return self._loaded is not None and thread is not None and thread.is_alive()

    def card(self) -> ModelCard:
        loaded = self._loaded
        extra: dict[str, object] = {"device": self.device, "dtype": self.dtype}
        if loaded is None:  # not started: what the directory says, without loading it
            length, parameters, created = (
                self.context_length or _config_context_length(self.path), None, 0)  # fmt: skip
        else:
            length, parameters, created = loaded.context_length, loaded.parameters, loaded.created
            extra = {"non_embedding_parameters": loaded.non_embedding_parameters,
                     "device": loaded.device, "dtype": self.dtype}  # fmt: skip
        return ModelCard(
            name=self.name, backend="local", role=self.role, context_length=length,
            parameters=parameters, parent=self.parent, created=created, extra=extra,
            supports=SUPPORTS,
        )  # fmt: skip

    def load(self) -> Load:
        return Load(waiting=len(self._waiting), running=len(self._rows), capacity=self.queue_size)

    # -- event-loop side -----------------------------------------------------------

    async def _submit(self, request: GenerationRequest) -> _Sequence:
        """Validate and queue `request`; raise instead of queueing what cannot run."""
        loaded, executor = self._loaded, self._tokenize
        if loaded is None or executor is None or not self._accepting:
            raise Unavailable(f"model {self.name!r} is not running", retry_after=5.0)
        params = request.params
        check_logit_bias(params, loaded.vocab_size)
        if request.tools is not None:
            raise InvalidParams(f"tools: model {self.name!r} cannot call tools (a local model "
                                "has no tool parser)", param="tools")  # fmt: skip
        loop = asyncio.get_running_loop()
        prompt_ids, constraint = await loop.run_in_executor(executor, _prepare, loaded, request)
        seq = _Sequence(
            request=request,
            prompt_ids=prompt_ids,
            text=TextState(IncrementalDetokenizer(loaded.detokenizer), params, loaded.eos_ids),
            chooser=TokenChooser(
                params,
                make_generator(params.seed),
                LogitsAdjuster.create(params, loaded.vocab_size),
                token_texts(loaded.detokenizer) if params.logprobs else None,
                constraint=constraint,
            ),
            loop=loop,
        )
        with self._cond:
            if not self._accepting:
                raise Unavailable(f"model {self.name!r} is stopping", retry_after=5.0)
            if len(self._waiting) >= self.queue_size:
                raise Overloaded(
                    f"model {self.name!r} is overloaded: {len(self._waiting)} requests are "
                    f"already waiting (queue_size={self.queue_size}); retry later",
                    retry_after=1.0,
                )
            self._waiting.append(seq)
            self._cond.notify()
        return seq

    def _cancel(self, seq: _Sequence) -> None:
        """The consumer went away: the worker drops the row at its next step."""
        seq.cancelled = True
        with self._cond:
            if seq in self._waiting:
                self._waiting.remove(seq)

    # -- worker side -----------------------------------------------------------------

    def _worker(self) -> None:
        reason = Unavailable(f"model {self.name!r} was stopped", retry_after=5.0)
        try:
            with torch.inference_mode():
                while self._step():
                    pass
        except Exception as exc:  # outside any batch's step: a bug in the scheduling itself
            log.exception("model worker of %r failed", self.name)
            reason = Unavailable(f"model {self.name!r} failed: {exc!r}", retry_after=5.0)
        finally:
            self._shutdown(reason)

    def _step(self) -> bool:
        """One scheduling iteration; False once the backend is stopping. A failure while
        prefilling newcomers fails only them (the running batch's cache is untouched until
        they join it); a failure while joining or decoding fails every running request and
        drops the batch's cache. Either way the worker goes on with the next step."""
        newcomers = self._admit()
        if newcomers is None:
            return False
        if newcomers:
            joined = self._guard(newcomers, "prefill", self._prefill, newcomers)
            if joined is not None:
                batch, rows = joined
                self._guard([*self._rows, *rows], "join", self._join, batch, rows)
        if self._rows:
            self._guard(self._rows, "decode", self._decode)
        return True

    def _guard(
        self, rows: list[_Sequence], stage: str, run: Callable[..., _T], *args: Any
    ) -> _T | None:
        """`run(*args)`; if it raises, fail `rows` (a 500 to each client), log the traceback
        once and, past the prefill, drop the running batch whose cache may be half-updated."""
        try:
            return run(*args)
        except Exception as exc:
            log.exception(
                "model %r: %s step failed; failing its %d request(s)", self.name, stage, len(rows)
            )
            if stage != "prefill":  # first, so a client told of the failure sees it done
                self._batch, self._rows = None, []
            for seq in rows:
                seq.fail(BackendError(f"model {self.name!r} failed in a {stage} step: {exc!r}"))
            return None

    def _admit(self) -> list[_Sequence] | None:
        """Take waiting requests into free slots; sleep while there is nothing to do."""
        with self._cond:
            while not self._stopping and not self._waiting and not self._rows:
                self._cond.wait()
            if self._stopping:
                return None
            newcomers: list[_Sequence] = []
            while self._waiting and len(self._rows) + len(newcomers) < self.max_batch_size:
                seq = self._waiting.popleft()
                if not seq.cancelled:
                    newcomers.append(seq)
            return newcomers

    def _prefill(self, newcomers: list[_Sequence]) -> tuple[KVBatch, list[_Sequence]] | None:
        """Run the newcomers' prompts and choose their first tokens; return their batch and
        the rows that go on (None when every one finished at once)."""
        assert self._loaded is not None
        batch, logits = KVBatch.prefill(self._loaded.model, [s.prompt_ids for s in newcomers])
        alive = self._advance(newcomers, logits)
        if not alive:
            return None
        if len(alive) < len(newcomers):
            batch.keep(alive)
        return batch, [newcomers[i] for i in alive]

    def _join(self, batch: KVBatch, rows: list[_Sequence]) -> None:
        if self._batch is None:
            self._batch, self._rows = batch, rows
        else:
            self._batch.extend(batch)
            self._rows = self._rows + rows

    def _decode(self) -> None:
        assert self._loaded is not None
        self._drop_finished()
        if self._batch is None:
            return
        tokens = torch.tensor([s.last_token for s in self._rows], dtype=torch.long)
        logits = self._batch.decode(self._loaded.model, tokens)
        alive = self._advance(self._rows, logits)
        self._keep(alive)

    def _drop_finished(self) -> None:
        """Free the slots and KV rows of sequences cancelled since the last step."""
        alive = [i for i, s in enumerate(self._rows) if not (s.cancelled or s.done)]
        if len(alive) < len(self._rows):
            self._keep(alive)

    def _keep(self, alive: list[int]) -> None:
        if len(alive) == len(self._rows):
            return
        if not alive:
            self._batch, self._rows = None, []
            return
        assert self._batch is not None
        self._batch.keep(alive)
        self._rows = [self._rows[i] for i in alive]

    def _advance(self, rows: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """Choose one token per row, send the text it completes; return the rows that go on."""
        logits = logits.float().cpu()
        alive: list[int] = []
        for i, seq in enumerate(rows):
            if seq.cancelled:
                continue
            seq.batch_size = max(seq.batch_size, len(rows))
            seq.last_token = seq.chooser.choose(logits[i])
            delta, reason = seq.text.push(seq.last_token)
            if reason is not None:
                self._finish(seq, delta, reason)
                continue
            alive.append(i)
            if delta and seq.request.stream:
                seq.deliver(GenerationChunk(text=delta, logprobs=seq.chooser.take_logprobs()))
        return alive

    def _finish(self, seq: _Sequence, delta: str, reason: FinishReason) -> None:
        seq.done = True
        seq.deliver(
            GenerationChunk(
                text=delta if seq.request.stream else seq.text.text,
                finish_reason=reason,
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=seq.text.tokens,
                batch_size=seq.batch_size,
                logprobs=seq.chooser.take_logprobs(),
            )
        )

    def _shutdown(self, reason: Unavailable) -> None:
        with self._cond:
            self._accepting = False
            pending = [*self._rows, *self._waiting]
            self._waiting.clear()
        for seq in pending:
            seq.fail(reason)
        self._rows, self._batch = [], None


def _prepare(loaded: _Loaded, request: GenerationRequest) -> tuple[list[int], Any]:
    """On the tokenising thread, in one hop: the prompt's ids, checked against the context,
    then the request's output constraint (compiling a schema takes a few ms, so not for a
    prompt that is refused anyway)."""
    ids, params = _encode(loaded.tokenizer, request), request.params
    if len(ids) + params.max_tokens > loaded.context_length:
        raise PromptTooLong(len(ids), params.max_tokens, loaded.context_length)
    if params.response_format is None:
        return ids, None
    return ids, loaded.constraints.create(params.response_format)


def _encode(tokenizer: Any, request: GenerationRequest) -> list[int]:
    """The prompt's token ids: the chat template for messages, the raw text otherwise."""
    if request.messages is not None:
        text = tokenizer.apply_chat_template(
            list(request.messages), add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(request.prompt)["input_ids"]
    if not ids:  # an empty raw prompt: the model needs at least one token to condition on
        bos = tokenizer.bos_token_id
        ids = [bos if bos is not None else tokenizer.eos_token_id]
    return list(ids)


def _count_parameters(model: Any) -> tuple[int, int]:
    """(all parameters, parameters outside the input and output embeddings); a tied
    output head shares the input embedding's tensor and is counted once."""
    total = sum(p.numel() for p in model.parameters())
    embeddings = {id(p): p.numel() for p in model.get_input_embeddings().parameters()}
    output = model.get_output_embeddings()
    if output is not None:
        embeddings.update({id(p): p.numel() for p in output.parameters()})
    return total, total - sum(embeddings.values())


def _config_context_length(path: Path) -> int:
    """max_position_embeddings from config.json, read without loading the model."""
    try:
        config = json.loads((path / "config.json").read_text())
        return int(config.get("max_position_embeddings", 2048))
    except (OSError, ValueError):
        return 2048
