"""Helpers of the server tests: a scripted stand-in for the engine's request API, a server on a thread, the
`omni-fast serve` command in a subprocess, the request bodies.

FakeEngine has the continuous-batching engine's request API (add_request / step / abort_request /
has_unfinished_requests, RequestOutput), so the server's own layer is tested without generation: every sample
emits a known token sequence one id per step and then an EOS id, a request whose cache key and prompt came
before reports its whole prompt as read from the prefix cache (num_cached_tokens), and the engine records what
the server asked of it. ThreadServer runs the real server (uvicorn, the FastAPI app, the engine loop) on a thread, on a free
port of 127.0.0.1. ServeProcess runs the command itself (`python -m omni_fast.cli serve --port 0 ...`) and reads
its address from the line it prints once it listens.
"""
from __future__ import annotations

import base64
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omni_fast.engine.sequence import Completion, row_seed


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[list[int]]
    finished: bool
    completions: list[Completion] | None = None
    num_cached_tokens: int = 0


@dataclass
class _Request:
    prompt: torch.Tensor
    params: object
    cache_key: str | None
    cached: int  # prompt rows "read from the prefix cache": all of them when an earlier request had its key and prompt
    ids: list[list[int]] = field(default_factory=list)
    done: list[bool] = field(default_factory=list)


class _Occupancy:
    """What the server's gauges read of an engine (Engine.scheduler.rows, .allocator, .prefix_cache), here from the
    requests the fake holds: one row per unfinished sample, one block per 16 prompt rows and per sample."""

    num_blocks = 4096
    evictable_blocks = 0

    def __init__(self, engine: FakeEngine):
        self.engine = engine

    @property
    def rows(self) -> int:
        return sum(r.done.count(False) for r in list(self.engine.requests.values()))

    @property
    def num_free(self) -> int:
        held = sum(-(-r.prompt.shape[0] // 16) + len(r.done) for r in list(self.engine.requests.values()))
        return self.num_blocks - held


class FakeEngine:
    def __init__(self, script: list[int], eos: int):
        self.script, self.eos = list(script), eos
        self.requests: dict[str, _Request] = {}  # what the engine holds right now ("its memory")
        self.added: dict[str, _Request] = {}  # every request ever added
        self.aborted: list[str] = []
        self.steps = 0
        self.abort_step: dict[str, int] = {}  # request -> the step count when it was aborted
        self.fail_next_step: Exception | None = None  # raised by the next step()
        self.fail_add = lambda request_id, params: None  # an exception add_request raises for that request
        self.step_gate = threading.Event()  # cleared: step() waits (a test holds the engine still)
        self.step_gate.set()
        self.lock = threading.Lock()
        self.scheduler = self.allocator = self.prefix_cache = _Occupancy(self)

    def token(self, request: _Request, sample: int, position: int) -> int:
        """Greedy: the script in order. Sampled: the script read from an offset set by the seed, one further for
        each sample (so the n samples of a request differ)."""
        p = request.params
        if position >= len(self.script):
            return self.eos
        seed = p.seed if p.seed is not None else 12345
        offset = 0 if p.temperature == 0 else row_seed(seed, 0) % len(self.script) + sample
        return self.script[(position + offset) % len(self.script)]

    def add_request(self, request_id: str, prompt: torch.Tensor, params, cache_key: str | None = None) -> None:
        error = self.fail_add(request_id, params)
        if error is not None:
            raise error
        with self.lock:
            assert request_id not in self.requests, request_id
            hit = cache_key is not None and any(r.cache_key == cache_key and torch.equal(r.prompt, prompt)
                                                for r in self.added.values())
            r = _Request(prompt, params, cache_key, prompt.shape[0] if hit else 0, [[] for _ in range(params.n)],
                         [False] * params.n)
            self.requests[request_id] = self.added[request_id] = r

    def abort_request(self, request_id: str) -> None:
        with self.lock:
            self.aborted.append(request_id)
            self.abort_step[request_id] = self.steps
            self.requests.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        self.step_gate.wait()
        with self.lock:
            self.steps += 1
            if self.fail_next_step is not None:
                e, self.fail_next_step = self.fail_next_step, None
                raise e
            outputs = []
            for rid, r in list(self.requests.items()):
                new = []
                for j in range(r.params.n):
                    if r.done[j]:
                        new.append([])
                        continue
                    t = self.token(r, j, len(r.ids[j]))
                    r.ids[j].append(t)
                    new.append([t])
                    r.done[j] = t == self.eos or len(r.ids[j]) >= r.params.max_tokens
                completions = None
                if all(r.done):
                    completions = [Completion(token_ids=ids, logprobs=-torch.arange(1, len(ids) + 1) / 8,
                                              finish_reason="stop" if ids[-1] == self.eos else "length")
                                   for ids in r.ids]
                    del self.requests[rid]
                outputs.append(RequestOutput(rid, new, completions is not None, completions, r.cached))
            return outputs


ANSWER = "<think>The brows are drawn together.</think><answer>angry</answer>"  # what the scripted engine says


def answer_script(omni, text: str = ANSWER) -> list[int]:
    """The token ids of a scripted answer."""
    return omni.tokenizer(text, add_special_tokens=False).input_ids


def scripted_engine(omni, script: list[int]) -> FakeEngine:
    """A FakeEngine that says `script`, then the checkpoint's first EOS id."""
    return FakeEngine(script, omni.loaded.generation.eos_token_ids[0])


class ThreadServer:
    """omni-fast serve's server (omni_fast.serve.server) on a thread, bound to a free port of 127.0.0.1."""

    def __init__(self, model, engine, samples=(), **config):
        from omni_fast.serve.config import ServeConfig
        from omni_fast.serve.server import bind, make_state, server_for

        self.state = make_state(model, ServeConfig(port=0, **config), engine)
        self.sock = bind("127.0.0.1", 0)
        self.server = server_for(self.state, announce=False, samples=samples)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def client(self, api_key: str = "none", timeout: float = 60.0):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=timeout)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def data_url(path: Path, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def user(*parts, text: str | None = None) -> list[dict]:
    """One user message with the given parts (dicts, or a path / URL string as a video_url) and an optional text."""
    content = [p if isinstance(p, dict) else {"type": "video_url", "video_url": {"url": str(p)}} for p in parts]
    if text is not None:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


class ServeProcess:
    """`omni-fast serve --port 0 ARGS` (or another command that serves, such as `demo --serve`) in a subprocess
    on 127.0.0.1, up once it prints where it listens; stopped with SIGTERM (its drain) on close. `output` holds
    its stderr lines."""

    LISTENING = re.compile(r"omni-fast serve: .* on (http://127\.0\.0\.1:\d+) ")

    def __init__(self, *args, command: tuple[str, ...] = ("serve",), start_timeout: float = 180.0):
        cmd = [sys.executable, "-m", "omni_fast.cli", *command, "--port", "0", *map(str, args)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.output: list[str] = []
        lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(lines,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise AssertionError(f"omni-fast serve did not start in {start_timeout:g} s:\n" +
                                     "\n".join(self.output)) from None
            if line is None:
                raise AssertionError(f"omni-fast serve exited with {self.proc.wait()}:\n" + "\n".join(self.output))
            found = self.LISTENING.search(line)
            if found:
                self.url = found.group(1)
                return

    def _read(self, lines: queue.Queue) -> None:
        for line in self.proc.stderr:
            self.output.append(line.rstrip("\n"))
            lines.put(line)
        lines.put(None)

    def client(self, api_key: str = "none", timeout: float = 120.0):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=timeout)

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
