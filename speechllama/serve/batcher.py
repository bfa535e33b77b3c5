"""Dynamic batching across HTTP requests: concurrent requests share one batched decoder call.

A decoder call over several rows reads the weights once for all of them, so requests that
arrive close together are decoded as one batch instead of one after another: one call per
token (or block of tokens) serves the whole batch. One worker thread owns the model: the
event loop only queues requests and awaits their futures, so torch never blocks it.

How a batch forms: the worker waits for a first request, then keeps collecting until
``max_wait`` seconds have passed since that request arrived or ``max_batch`` requests are in
hand, whichever comes first; so batching adds at most ``max_wait`` to a request's latency. A
request that arrives while a batch is decoding waits in the queue and joins the next batch
(under load, batches fill without any waiting). ``max_batch = 1`` turns batching off.

Within a batch, each request is answered as soon as its sequence ends, while the others go on
decoding (``engine``: requests are encoded one by one and decoded together).

Failure isolation: a bad input becomes an errored ``DecodingResult`` for that request alone;
if a whole batch raises, each of its unanswered requests is decoded again on its own, so one
poison request cannot fail the others.

Bounded queue: at most ``max_queue`` requests wait; ``submit`` raises :class:`Overloaded`
(with a retry estimate) beyond that, and :class:`ShuttingDown` once ``close`` has begun.
``close`` lets every queued and in-flight request finish before the worker exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from speechllama.decoding.options import DecodingResult
    from speechllama.serve.engine import Engine

__all__ = ["BatchInfo", "Batcher", "Overloaded", "ShuttingDown"]

log = logging.getLogger("speechllama.serve")


class Overloaded(RuntimeError):
    """The queue is full; ``retry_after`` (whole seconds) estimates when a slot frees."""

    def __init__(self, queued: int, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(f"server overloaded: {queued} requests already queued")


class ShuttingDown(RuntimeError):
    """The server is finishing the requests it has and takes no new ones."""


@dataclass(frozen=True)
class BatchInfo:
    """The batch a request was decoded in.

    ``decoder_calls`` counts the batched decoder calls (prefill included) the batch had made
    when this request left it: a cost shared by the whole batch, whereas
    ``DecodingResult.decoder_calls`` counts the calls one request took part in.
    ``queue_seconds`` is the request's wait before its batch started, ``batch_seconds`` the
    time from then until its result was ready."""

    batch_id: int
    size: int
    decoder_calls: int
    queue_seconds: float
    batch_seconds: float


@dataclass
class _Request:
    wave: np.ndarray
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class _Counters:
    requests: int = 0
    batches: int = 0
    rejected: int = 0
    failed: int = 0
    busy_seconds: float = 0.0
    largest_batch: int = 0


_STOP = object()


class Batcher:
    """Queue requests from any event loop; decode them in batches on one worker thread."""

    def __init__(
        self,
        engine: Engine,
        max_batch: int = 8,
        max_wait: float = 0.01,
        max_queue: int = 64,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must not be negative, got {max_wait}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.engine = engine
        self._calls0 = engine.decoder_calls
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.counters = _Counters()
        self._queue: queue.Queue = queue.Queue()
        self._waiting = 0  # requests queued, not yet taken into a batch
        self._lock = threading.Lock()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="speechllama-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    async def submit(self, wave: np.ndarray) -> tuple[DecodingResult, BatchInfo]:
        """Decode one 16 kHz mono waveform (float32, (samples,)) in the next batch."""
        loop = asyncio.get_running_loop()
        request = _Request(wave=wave, future=loop.create_future(), loop=loop)
        with self._lock:
            if self._closing:
                raise ShuttingDown("server is shutting down")
            if self._waiting >= self.max_queue:
                self.counters.rejected += 1
                raise Overloaded(self._waiting, self._retry_after())
            self._waiting += 1
        self._queue.put(request)
        return await request.future

    def _retry_after(self) -> int:
        """Seconds until the queue has room, from the mean batch time so far (at least 1)."""
        c = self.counters
        per_batch = c.busy_seconds / c.batches if c.batches else 1.0
        return max(1, math.ceil(per_batch * self._waiting / self.max_batch))

    async def close(self) -> None:
        """Refuse new requests, finish the queued and in-flight ones, stop the worker."""
        with self._lock:
            self._closing = True
        self._queue.put(_STOP)
        if self._thread.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def stats(self) -> dict[str, float | int]:
        c = self.counters
        return {
            "requests": c.requests,
            "batches": c.batches,
            "decoder_calls": self.engine.decoder_calls - self._calls0,
            "failed": c.failed,
            "rejected": c.rejected,
            "queued": self._waiting,
            "largest_batch": c.largest_batch,
            "mean_batch_size": c.requests / c.batches if c.batches else 0.0,
            "busy_seconds": round(c.busy_seconds, 4),
        }

    # -- worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            deadline = first.arrived + self.max_wait
            while len(batch) < self.max_batch:
                timeout = deadline - time.perf_counter()
                try:
                    item = (
                        self._queue.get(timeout=timeout)
                        if timeout > 0
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
                if item is _STOP:  # finish what is queued first: _STOP was put last
                    stopping = True
                    break
                batch.append(item)
            with self._lock:
                self._waiting -= len(batch)
            self._decode(batch)
        self._drain()

    def _drain(self) -> None:
        """Decode whatever is still queued (nothing can be added once closing)."""
        rest = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                rest.append(item)
        for start in range(0, len(rest), self.max_batch):
            chunk = rest[start : start + self.max_batch]
            with self._lock:
                self._waiting -= len(chunk)
            self._decode(chunk)

    def _decode(self, batch: list[_Request]) -> None:
        """Decode ``batch``; each request is resolved as soon as its result is known."""
        started = time.perf_counter()
        calls0 = self.engine.decoder_calls
        c = self.counters
        c.batches += 1
        c.largest_batch = max(c.largest_batch, len(batch))
        batch_id = c.batches
        answered: set[int] = set()

        def on_result(index: int, result: DecodingResult) -> None:
            request = batch[index]
            now = time.perf_counter()
            calls = self.engine.decoder_calls - calls0
            info = BatchInfo(batch_id, len(batch), calls, started - request.arrived, now - started)
            answered.add(index)
            c.requests += 1
            c.failed += bool(result.error)
            _resolve(request, (result, info))

        try:
            self.engine.run([r.wave for r in batch], on_result)
        except Exception as exc:  # isolate the failure: decode each request on its own
            rest = [r for i, r in enumerate(batch) if i not in answered]
            log.warning("batch of %d failed (%s); retrying %d alone", len(batch), exc, len(rest))
            if len(batch) > 1:
                c.batches -= 1
                for request in rest:
                    self._decode([request])
            elif not answered:
                c.failed += 1
                _resolve(batch[0], exc)
        finally:
            c.busy_seconds += time.perf_counter() - started


def _resolve(request: _Request, outcome: object) -> None:
    """Hand the outcome (a value or an exception) to the request's event loop."""

    def settle() -> None:
        if request.future.done():  # the client went away and the handler was cancelled
            return
        if isinstance(outcome, BaseException):
            request.future.set_exception(outcome)
        else:
            request.future.set_result(outcome)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
        request.loop.call_soon_threadsafe(settle)
