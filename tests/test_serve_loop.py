"""The engine loop thread over the engine's request API (a scripted engine here; tests/test_serve.py drives the
real one): events in order, aborts done before the next step, one request's fault kept to that request."""
import contextlib
import queue
import threading
import time

import pytest
import torch

from serve_support import FakeEngine
from omni_fast.config import SamplingParams
from omni_fast.serve.loop import EngineLoop, Failed, Prepared, Started
from omni_fast.serve.protocol import ServeError

EOS = 99
SCRIPT = [5, 6, 7]


class Sink:
    def __init__(self):
        self.events = queue.Queue()

    def __call__(self, event):
        self.events.put(event)

    def next(self, timeout=60.0):  # generous: a loaded machine (it returns with the event)
        return self.events.get(timeout=timeout)

    def until_end(self):
        out = []
        while True:
            e = self.next()
            out.append(e)
            if isinstance(e, Failed) or getattr(e, "finished", False):
                return out


def _prepared(n=1, rows=4, **kw):
    return lambda: Prepared(prompt=torch.zeros(rows, 8), params=SamplingParams(n=n, temperature=0, **kw))


@pytest.fixture()
def loop():
    engine = FakeEngine(SCRIPT, EOS)
    lp = EngineLoop(engine)
    lp.start()
    yield lp, engine
    lp.stop(5)


def test_events_in_order(loop):
    lp, engine = loop
    sink = Sink()
    lp.submit("a", _prepared(n=2, rows=7), sink)
    events = sink.until_end()
    assert isinstance(events[0], Started) and events[0].prompt_tokens == 7
    outs = events[1:]
    assert [o.new_token_ids for o in outs] == [[[t], [t]] for t in SCRIPT + [EOS]]
    assert [o.finished for o in outs] == [False] * 3 + [True]
    assert [c.token_ids for c in outs[-1].completions] == [SCRIPT + [EOS]] * 2
    assert not engine.requests


def test_abort_is_done_before_the_next_step(loop):
    lp, engine = loop
    sink = Sink()
    engine.step_gate.clear()  # the engine holds still inside step()
    lp.submit("a", _prepared(max_tokens=1000), sink)
    assert isinstance(sink.next(), Started)
    lp.abort("a")
    steps = engine.steps
    engine.step_gate.set()
    deadline = time.monotonic() + 60  # generous: a loaded machine; it ends as soon as the abort is seen
    while "a" not in engine.aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.aborted == ["a"] and not engine.requests
    assert engine.abort_step["a"] == steps + 1  # right after the step that was running when abort() came


@pytest.mark.parametrize("together", [False, True])
def test_abort_before_it_is_added(loop, together):
    """A request aborted before its turn is never prepared nor added: submitted after the loop thread took the
    request it is preparing, or taken with it in one batch (the loop lock held over both submits)."""
    lp, engine = loop
    gate, preparing, calls = threading.Event(), threading.Event(), []
    blocker, aborted = Sink(), Sink()

    def slow_prepare():
        preparing.set()
        gate.wait(60)
        return _prepared()()

    with lp._cond if together else contextlib.nullcontext():
        lp.submit("slow", slow_prepare, blocker)  # holds the loop thread inside prepare
        lp.submit("b", lambda: calls.append("b") or _prepared()(), aborted)
    assert preparing.wait(60)
    lp.abort("b")
    gate.set()
    blocker.until_end()
    assert "b" not in engine.added and calls == []


@pytest.mark.parametrize("error, status, words", [(ServeError(400, "prompt too long"), 400, "prompt too long"),
                                                  (RuntimeError("towers\nexploded"), 500, "RuntimeError: towers exploded")])
def test_a_failing_request_fails_alone(loop, error, status, words):
    lp, engine = loop
    good, bad, after = Sink(), Sink(), Sink()

    def failing():
        raise error

    lp.submit("good", _prepared(), good)
    lp.submit("bad", failing, bad)
    lp.submit("after", _prepared(), after)
    (failed,) = bad.until_end()
    assert isinstance(failed, Failed) and failed.status == status and failed.message == words
    assert good.until_end()[-1].completions[0].token_ids == SCRIPT + [EOS]
    assert after.until_end()[-1].finished and lp.alive


def test_a_request_the_engine_cannot_hold_is_400(loop):
    lp, engine = loop
    engine.fail_add = lambda rid, params: ValueError(f"add_request {rid!r}: its prompt and 1 x 9 tokens need 9 KV "
                                                     "blocks, the pool holds 4") if rid == "big" else None
    big, small = Sink(), Sink()
    lp.submit("big", _prepared(), big)
    lp.submit("small", _prepared(), small)
    (failed,) = big.until_end()
    assert isinstance(failed, Failed) and failed.status == 400
    assert failed.message == "add_request 'big': its prompt and 1 x 9 tokens need 9 KV blocks, the pool holds 4"
    assert small.until_end()[-1].finished


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(loop):
    lp, engine = loop
    first = Sink()
    engine.step_gate.clear()
    lp.submit("a", _prepared(), first)
    assert isinstance(first.next(), Started)
    engine.fail_next_step = RuntimeError("CUDA error: an illegal memory access")
    engine.step_gate.set()
    failed = first.next()
    assert isinstance(failed, Failed) and failed.status == 500 and "illegal memory access" in failed.message
    assert "a" in engine.aborted and not engine.requests
    later = Sink()
    lp.submit("b", _prepared(), later)
    assert later.until_end()[-1].finished and lp.alive


def test_stop_fails_what_is_left(loop):
    lp, engine = loop
    sink = Sink()
    engine.step_gate.clear()
    lp.submit("a", _prepared(max_tokens=1000), sink)
    assert isinstance(sink.next(), Started)
    lp.stop(timeout=0)  # asks the thread to end; it is held inside step() until the gate opens
    engine.step_gate.set()
    lp.stop(5)
    events = sink.until_end()
    assert isinstance(events[-1], Failed) and events[-1].status == 503
    assert not lp.alive
    with pytest.raises(ServeError, match="shutting down"):
        lp.submit("b", _prepared(), Sink())
