"""The engine loop: one thread that owns the engine and calls Engine.step() while any request is unfinished.

    loop = EngineLoop(model.engine)
    loop.start()
    loop.submit(request_id, prepare, sink)   # any thread; prepare() runs on the loop thread
    loop.abort(request_id)                   # any thread; done before the next step

Each iteration: the aborts that came in are done (Engine.abort_request frees the request's memory at once),
then the new requests are prepared (their encoders and prompt embeddings, on the loop thread so the model is
only ever run by this thread; one aborted before its turn is not) and added (Engine.add_request), then one
Engine.step(). Every event of a request
goes to its `sink` (the server hands it to the request's asyncio queue): Started once it is in the engine, each
RequestOutput (new tokens per sample; the completions when finished), or Failed. The thread sleeps while
there is nothing to do.

Faults stay with their request: an exception in one request's prepare() or add_request fails that request only
(a ServeError keeps its status, a ValueError from add_request - a request the engine can never hold - is a
400, anything else a 500 with a one-line message) and the loop goes on. An
exception from Engine.step() cannot be pinned on one request, so every request in the engine at that step is
aborted and failed with a 500, and the loop goes on with the next requests.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch

from omni_fast.config import SamplingParams
from omni_fast.serve.protocol import ServeError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Prepared:
    prompt: torch.Tensor  # (T, hidden) prompt embeddings
    params: SamplingParams  # max_tokens fitted to the positions the prompt leaves
    cache_key: str | None = None  # the engine's prefix-cache key (None: no reuse)


@dataclass(slots=True)
class Started:
    prompt_tokens: int  # positions of the prompt (text + video + audio embeddings)
    max_tokens: int  # the fitted max_tokens
    prepare_s: float = 0.0  # seconds prepare() took on the loop thread (encoders, projectors, gate, splicing)


@dataclass(slots=True)
class Failed:
    status: int  # HTTP status for the client
    message: str  # one line


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class EngineLoop:
    def __init__(self, engine):
        self.engine = engine  # add_request / step / abort_request / has_unfinished_requests
        self._cond = threading.Condition()
        self._inbox: deque[tuple[str, Callable[[], Prepared], Callable[[Any], None]]] = deque()
        self._aborts: set[str] = set()
        self._sinks: dict[str, Callable[[Any], None]] = {}  # requests in the engine (loop thread only)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # Engine.step() calls so far

    # --- any thread ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="omni-engine-loop", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, request_id: str, prepare: Callable[[], Prepared], sink: Callable[[Any], None]) -> None:
        with self._cond:
            if self._stopping:
                raise ServeError(503, "the server is shutting down")
            self._inbox.append((request_id, prepare, sink))
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        """Abort a request before the next step (a no-op for one that finished or was never submitted)."""
        with self._cond:
            self._aborts.add(request_id)
            self._cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        """End the thread after its current iteration; requests still in it are failed with a 503."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the loop thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._inbox or self._aborts or self._stopping or self._sinks):
                    self._cond.wait()
                if self._stopping:
                    break
                new, self._inbox = list(self._inbox), deque()
                aborts, self._aborts = self._aborts, set()
            try:
                self._iteration(new, aborts)
            except Exception as e:  # noqa: BLE001 - a bug here must not end the server's only engine thread
                log.exception("engine loop iteration failed")
                self._fail_all(Failed(500, one_line(e)))
        self._fail_all(Failed(503, "the server is shutting down"))
        with self._cond:
            pending, self._inbox = list(self._inbox), deque()
        for _, _, sink in pending:
            _send(sink, Failed(503, "the server is shutting down"))

    def _iteration(self, new, aborts: set[str]) -> None:
        for request_id in aborts:
            if self._sinks.pop(request_id, None) is not None:
                self.engine.abort_request(request_id)
        for request_id, prepare, sink in new:
            with self._cond:  # aborted meanwhile (while an earlier request was prepared): not prepared at all
                gone = request_id in aborts or request_id in self._aborts
            if not gone:
                self._add(request_id, prepare, sink)
        if not self._sinks:
            return
        if not self.engine.has_unfinished_requests():  # never when the engine keeps its API; no busy loop if not
            self._fail_all(Failed(500, "the engine dropped the request without finishing it"))
            return
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - see the module docstring
            log.exception("Engine.step() failed; failing the %d requests in it", len(self._sinks))
            self._fail_all(Failed(500, f"the engine step failed: {one_line(e)}"))
            return
        self.steps += 1
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            if out.finished:
                del self._sinks[out.request_id]
            _send(sink, out)

    def _add(self, request_id: str, prepare: Callable[[], Prepared], sink: Callable[[Any], None]) -> None:
        try:
            t0 = time.monotonic()
            prepared = prepare()
            prepare_s = time.monotonic() - t0
            try:
                self.engine.add_request(request_id, prepared.prompt, prepared.params, prepared.cache_key)
            except ValueError as e:  # the engine refuses a request it can never hold (positions, KV pool, n)
                raise ServeError(400, " ".join(str(e).split()) or type(e).__name__) from None
        except ServeError as e:
            _send(sink, Failed(e.status, e.message))
            return
        except Exception as e:  # noqa: BLE001 - one request's fault stays with it
            log.exception("request %s failed before generation", request_id)
            _send(sink, Failed(500, one_line(e)))
            return
        self._sinks[request_id] = sink
        _send(sink, Started(prompt_tokens=int(prepared.prompt.shape[0]), max_tokens=prepared.params.max_tokens,
                            prepare_s=prepare_s))

    def _fail_all(self, failure: Failed) -> None:
        for request_id, sink in list(self._sinks.items()):
            try:
                self.engine.abort_request(request_id)
            except Exception:  # noqa: BLE001 - freeing what can be freed; the request fails either way
                log.exception("aborting %s failed", request_id)
            _send(sink, failure)
        self._sinks.clear()


def _send(sink: Callable[[Any], None], event: Any) -> None:
    try:
        sink(event)
    except Exception:  # noqa: BLE001 - a closed event loop or queue must not stop the engine thread
        log.exception("could not hand an event to its request")
