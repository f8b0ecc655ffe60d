"""ServeConfig: everything `omni-fast serve` sets besides the model and the engine, validated on creation."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from omni_fast.config import ConfigError

_HOST = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")  # a DNS name or IPv4
MIB = 1 << 20


@dataclass(slots=True)
class ServeConfig:
    host: str = "127.0.0.1"  # address to bind; loopback unless told otherwise
    port: int = 8000  # TCP port; 0 picks a free one (printed at startup)
    served_model_name: str = "omni-fast"  # the `model` clients name and /v1/models lists
    api_key: str | None = None  # when set, every endpoint but /health needs "Authorization: Bearer <key>"
    allowed_local_media_path: str | None = None  # media may name files under this directory (None: none)
    allowed_media_domains: tuple[str, ...] = ()  # http(s) hosts media may be fetched from (empty: no remote fetch)
    max_request_bytes: int = 64 * MIB  # largest request body, and largest fetched media file
    max_clip_seconds: float = 60.0  # longest clip (video or audio) accepted
    max_queue: int = 256  # requests waiting for their first token at once; one more is a 429
    request_timeout: float = 600.0  # seconds from arrival to the last token; also SIGTERM's grace period
    max_num_seqs: int = 256  # sample rows the engine runs at once: a request's n may not exceed it
    fetch_timeout: float = 30.0  # seconds to fetch one remote media file (vLLM's video fetch timeout)
    media_workers: int = 4  # threads that fetch-to-disk, probe and decode media (never the event loop)
    ui: bool = False  # serve the page at /ui (omni_fast.serve.ui; needs the `ui` extra)
    enable_prefix_caching: bool = True  # requests carry a prefix-cache key (OmniModel.prefix_key); False: none does

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port}: expected 0..65535")
        if not self.served_model_name:
            raise ConfigError("--served_model_name: expected a non-empty name")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("--api_key: expected a non-empty key")
        for name in ("max_request_bytes", "max_queue", "max_num_seqs", "media_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} {getattr(self, name)}: expected a number >= 1")
        for name in ("max_clip_seconds", "request_timeout", "fetch_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name} {getattr(self, name)}: expected a number of seconds > 0")
        if self.allowed_local_media_path is not None:
            root = Path(self.allowed_local_media_path)
            if not root.is_dir():
                raise ConfigError(f"--allowed_local_media_path {root}: not a directory")
            self.allowed_local_media_path = str(root.resolve())
        domains = tuple(d.lower().rstrip(".") for d in self.allowed_media_domains)
        for d in domains:
            if not _HOST.fullmatch(d):
                raise ConfigError(f"--allowed_media_domains {d!r}: expected a host name such as example.com "
                                  "(no scheme, port or path)")
        self.allowed_media_domains = domains
