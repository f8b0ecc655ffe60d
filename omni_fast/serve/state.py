"""What the routes share: the model, the engine loop, the worker pool and its decodings, the metrics, and the request
counts."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from omni_fast.serve.config import ServeConfig
from omni_fast.serve.inputs import Decoding
from omni_fast.serve.loop import EngineLoop
from omni_fast.serve.metrics import Metrics
from omni_fast.serve.sampling import SamplingDefaults


@dataclass(slots=True)
class ServerState:
    config: ServeConfig
    model: object  # OmniModel: tokenizer, prompt_embeds, fit_positions, device, config
    loop: EngineLoop
    defaults: SamplingDefaults  # generation_config.json's sampling defaults
    pool: ThreadPoolExecutor  # media work, never on the event loop
    decoding: Decoding = field(default_factory=Decoding)  # the clips being decoded now (decoded once if repeated)
    metrics: Metrics = field(init=False)
    waiting: int = 0  # accepted, no first token yet (media, encoders, engine queue)
    running: int = 0  # streaming tokens
    rows: int = 0  # the running requests' unfinished sample rows
    draining: bool = False  # SIGTERM / Ctrl-C seen: new requests get 503, running ones finish
    created: int = field(default_factory=lambda: int(time.time()))
    url: str | None = None  # where this server answers, once it listens (the page's requests go there)

    def __post_init__(self) -> None:
        self.metrics = Metrics(waiting=lambda: self.waiting, running=lambda: self.running, rows=lambda: self.rows,
                               engine=self.loop.engine)

    @property
    def in_flight(self) -> int:
        return self.waiting + self.running

    @property
    def healthy(self) -> bool:
        return self.loop.alive and not self.draining
