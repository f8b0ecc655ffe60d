"""Running the server: the state around a loaded OmniModel, uvicorn on a socket bound here, and draining.

SIGTERM or Ctrl-C starts a drain: new requests get 503 (and /health 503, so a load balancer stops sending),
the requests already accepted run to their end (at most --request_timeout, after which each ends with its
timeout error), then uvicorn closes and the process exits 0. A second signal skips the wait (uvicorn's own
shutdown, which a third Ctrl-C forces).
"""
from __future__ import annotations

import contextlib
import logging
import socket
import sys
from concurrent.futures import ThreadPoolExecutor

import uvicorn

from omni_fast.serve.app import build_app
from omni_fast.serve.config import ServeConfig
from omni_fast.serve.loop import EngineLoop
from omni_fast.serve.sampling import SamplingDefaults
from omni_fast.serve.state import ServerState

log = logging.getLogger(__name__)
LOOP_STOP_TIMEOUT_S = 30.0  # how long shutdown waits for the engine loop's current step


def make_state(model, config: ServeConfig, engine=None) -> ServerState:
    """The server's shared state around a loaded OmniModel (engine: the model's own unless one is given)."""
    return ServerState(config=config, model=model, loop=EngineLoop(engine if engine is not None else model.engine),
                       defaults=SamplingDefaults.from_generation_config(model.loaded.generation.config),
                       pool=ThreadPoolExecutor(config.media_workers, thread_name_prefix="omni-serve-media"))


def make_app(state: ServerState, samples=()):
    """The FastAPI app whose lifespan starts the engine loop and stops it (and the worker pool) at shutdown; with
    ServeConfig.ui, the page mounted at /ui (samples: its sample clips, omni_fast.serve.ui.Sample)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.loop.start()
        try:
            yield
        finally:
            state.loop.stop(LOOP_STOP_TIMEOUT_S)
            state.pool.shutdown(wait=False, cancel_futures=True)

    app = build_app(state, lifespan)
    if state.config.ui:
        from fastapi.responses import RedirectResponse

        from omni_fast.serve.ui import PATH, mount_page

        mount_page(app, state, list(samples))
        app.add_api_route("/", lambda: RedirectResponse(PATH + "/"), include_in_schema=False)
    return app


def bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the first SIGTERM / Ctrl-C turned into a drain (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, announce: bool = True):
        super().__init__(config)
        self.state, self.announce = state, announce

    def handle_exit(self, sig, frame) -> None:
        if self.state.draining:
            return super().handle_exit(sig, frame)
        self.state.draining = True
        log.info("draining: %d requests in flight; new requests get 503", self.state.in_flight)

    async def on_tick(self, counter: int) -> bool:
        if self.state.draining and self.state.in_flight == 0:
            self.should_exit = True
        return await super().on_tick(counter)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if not sockets:
            return
        host, port = sockets[0].getsockname()[:2]
        self.state.url = own_url(host, port)
        if self.announce:
            shown = f"[{host}]" if ":" in host else host
            page = f"; the page at http://{shown}:{port}/ui" if self.state.config.ui else ""
            print(f"omni-fast serve: {self.state.config.served_model_name} on http://{shown}:{port} "
                  f"(OpenAI API under /v1{page})", file=sys.stderr, flush=True)


def own_url(host: str, port: int) -> str:
    """The URL this process reaches its own server at: the bound address, loopback for a wildcard one."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def server_for(state: ServerState, announce: bool = True, samples=()) -> DrainingServer:
    config = uvicorn.Config(make_app(state, samples), lifespan="on", log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    return DrainingServer(config, state, announce)


def serve(model, config: ServeConfig, engine=None, samples=()) -> int:
    """Serve until SIGTERM / Ctrl-C has drained the requests; returns the exit status (0). samples: the page's
    sample clips (with ServeConfig.ui)."""
    state = make_state(model, config, engine)
    sock = bind(config.host, config.port)
    server_for(state, samples=samples).run(sockets=[sock])
    return 0
