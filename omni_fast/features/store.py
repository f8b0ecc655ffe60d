"""The tower-feature store: each clip's frozen tower outputs on disk, computed once and read by every later run.

    store = FeatureStore(root, FeatureSettings.of(model, loader_config, device))
    entry = store.get(content)                # content = key.content_hash(record); None: a miss
    store.put(content, {"vision": v, "audio": a}, info)

Layout (one safetensors file per clip: a batch of 8-64 clips loads as fast as from 16-clip shards, and a file
per clip makes every write atomic on its own and every entry independent; benchmarks/bench_features.py):

    root/store.json                      {"omni_fast_features": FORMAT}
    root/<settings digest>/settings.json the FeatureSettings its entries were made with
    root/<settings digest>/<c[:2]>/<c>.safetensors    c = the clip's content hash

An entry holds the tensors the model consumes, before the projectors, in the dtype the towers ran in:
"vision" (num_frames, 196, 768) SigLIP layer features where the modal has video, "audio" (500, 1280) pooled
Whisper features where it has audio, each with the memory layout the tower gave it (SigLIP's features come out
patch-minor, the transpose of a plain row-major tensor, and the projector's convolution takes another kernel
for the other layout: stored row-major, a clip's features would cost the policy's backward several times more
on the CPU). The bytes are written in that memory order and read back as the same strided view. Its metadata
holds its key, the layouts, the clip's facts (sampled indices, frame count, audio seconds) and a CRC-32 of all
of that and the tensor bytes. Runs with other settings (other towers, dtype, aspect,
preprocessing...) are kept apart, each in its own folder, with one log line naming what differs from the folders
already there; a folder whose settings.json disagrees with the settings it is named after is refused, and so is a
store of another format or one that cannot be created (a StoreError naming why).

Never a wrong feature: an entry that cannot be parsed, is truncated, fails its checksum or names another key is
logged, removed, and reported as a miss (the caller computes the clip and puts it again). Writes are atomic
(atomic.write_new) and never replace an entry: of several processes putting one clip (ranks of a
torchrun job) exactly one publishes it, the others' copies are dropped. A write that fails (disk full, a
read-only folder) leaves nothing behind, is logged once, and turns writing off for the rest of the run, which
goes on reading the entries already there. Entries are not fsynced: a file torn by a power cut fails its
checksum and is recomputed.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from omni_fast.atomic import write_new
from omni_fast.features.key import FeatureSettings

log = logging.getLogger(__name__)

FORMAT = 1  # store.json's "omni_fast_features"
STORE_FILE = "store.json"
SETTINGS_FILE = "settings.json"
SUFFIX = ".safetensors"
TENSORS = ("vision", "audio")
STORE = "store"  # Entry.source of an entry read from a store


class StoreError(ValueError):
    """A store that cannot be used with these settings; the message names the folder and what differs."""


class StoreUnwritable(StoreError):
    """A store that cannot be created or opened for writing (disk full, no permission); the message says why. A
    run that only benefits from the store goes on without it."""


@dataclass(slots=True)
class Entry:
    features: dict[str, torch.Tensor]  # "vision" and / or "audio", on the CPU, in the towers' dtype
    info: dict  # the clip's facts as the loader gave them (indices, num_frames_total, audio_seconds, ...)
    source: str = STORE  # where it was read from: STORE, or memory.MEMORY (the encoder cache)


@dataclass(slots=True)
class StoreStats:
    hits: int = 0  # get() found a whole entry
    misses: int = 0  # get() found none (or a bad one)
    corrupt: int = 0  # entries found bad (unreadable, truncated, checksum, key) and removed
    written: int = 0  # entries this process published
    bytes_written: int = 0  # their size on disk
    already_there: int = 0  # puts dropped because another writer published the entry first
    write_failures: int = 0  # puts that failed (the first one turned writing off)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class _Counter:
    stats: StoreStats = field(default_factory=StoreStats)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, n in counts.items():
                setattr(self.stats, k, getattr(self.stats, k) + n)


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """CRC-32 of the tensors' bytes in memory order (a dense view in any layout), in TENSORS order."""
    crc = 0
    for name in TENSORS:
        if name in tensors:
            t = tensors[name]
            t = t.permute(layout(t)).contiguous()  # no copy for a dense tensor
            crc = zlib.crc32(t.view(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


def entry_checksum(tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """An entry's CRC-32: its metadata (all but the CRC: key, layouts, clip facts) and its tensors' bytes."""
    head = json.dumps({k: v for k, v in meta.items() if k != "crc32"}, sort_keys=True).encode()
    return f"{zlib.crc32(head, int(checksum(tensors), 16)):08x}"


def layout(t: torch.Tensor) -> list[int]:
    """The order of t's dims in memory, outermost first (a row-major tensor: 0, 1, ...)."""
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))


def inverse_layout(order: list[int]) -> list[int]:
    """The permutation that undoes `order` (t.permute(order).permute(inverse_layout(order)) is t)."""
    return sorted(range(len(order)), key=lambda d: order[d])


class FeatureStore:
    def __init__(self, root: str | Path, settings: FeatureSettings):
        self.root = Path(root).expanduser()
        self.settings = settings
        self.dir = self.root / settings.digest
        self._counter = _Counter()
        self._write_error: str | None = None  # why writing is off (None: on)
        self._open()

    # --- opening -----------------------------------------------------------------------------------------------
    def _open(self) -> None:
        try:
            self._open_folders()
        except OSError as e:
            raise StoreUnwritable(f"tower cache {self.root}: cannot write there ({e.strerror or e})") from None

    def _open_folders(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"tower cache {self.root} is not a directory")
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / STORE_FILE
        if not marker.is_file():
            others = [p.name for p in self.root.iterdir() if not p.name.startswith(".") and p.name != STORE_FILE]
            if others and not marker.is_file():  # (another rank may have just made the store)
                raise StoreError(f"tower cache {self.root}: the directory holds other files ({', '.join(others[:3])}) "
                                 f"and no {STORE_FILE}; give an empty or new directory for a store")
            write_new(marker, (json.dumps({"omni_fast_features": FORMAT}) + "\n").encode())
        found = _read_json(marker).get("omni_fast_features")
        if found != FORMAT:
            raise StoreError(f"tower cache {self.root}: store format {found!r}, this omni_fast reads format {FORMAT}; "
                             "give another --tower_cache_dir (or remove this one)")
        new = not (self.dir / SETTINGS_FILE).is_file()
        self.dir.mkdir(exist_ok=True)
        write_new(self.dir / SETTINGS_FILE, (json.dumps(self.settings.as_dict(), indent=1) + "\n").encode())
        stored = _read_json(self.dir / SETTINGS_FILE)
        diff = self.settings.differences(stored)
        if diff:
            raise StoreError(f"tower cache {self.dir}: made with other settings than the folder's name says "
                             f"({'; '.join(diff)}); remove that folder")
        if new:
            self._log_others()

    def _log_others(self) -> None:
        """One line when this run's settings are new to a store that holds others: what differs, per folder."""
        others = []
        for d in sorted(p for p in self.root.iterdir() if p.is_dir() and p != self.dir):
            if (d / SETTINGS_FILE).is_file():
                with contextlib.suppress(StoreError):
                    others.append(f"{d.name} ({', '.join(self.settings.differences(_read_json(d / SETTINGS_FILE)))})")
        if others:
            log.info("tower cache %s: no features yet for this run's settings (folder %s); kept apart from those "
                     "made with other settings: %s", self.root, self.dir.name, "; ".join(others))

    # --- reading -----------------------------------------------------------------------------------------------
    def path(self, content: str) -> Path:
        return self.dir / content[:2] / f"{content}{SUFFIX}"

    def get(self, content: str) -> Entry | None:
        """The clip's entry, checked, or None (a miss: absent, or bad and removed with a log line)."""
        path = self.path(content)
        try:
            entry = self._read(path, content)
        except FileNotFoundError:
            self._counter.add(misses=1)
            return None
        except (OSError, SafetensorError, ValueError, KeyError) as e:
            self._drop(path, str(e))
            self._counter.add(misses=1, corrupt=1)
            return None
        self._counter.add(hits=1)
        return entry

    def has(self, content: str) -> bool:
        """Whether a whole entry is there, without reading its tensors: the header parses and the file is as long
        as it says (a cheap check for resuming; get() verifies the checksum too)."""
        try:
            with safe_open(str(self.path(content)), framework="pt") as f:
                return f.metadata().get("key") == self.settings.key(content)
        except (OSError, SafetensorError, ValueError):
            return False

    def _read(self, path: Path, content: str) -> Entry:
        with safe_open(str(path), framework="pt") as f:  # memory-maps the file; a truncated one fails here
            meta = f.metadata() or {}
            stored = {name: f.get_tensor(name) for name in f.keys()}  # in memory order
        if meta.get("key") != self.settings.key(content):
            raise ValueError(f"it holds the features of {meta.get('key')!r}")
        layouts = json.loads(meta.get("layout", "{}"))
        if sorted(layouts) != sorted(stored) or any(sorted(layouts[n]) != list(range(t.dim()))
                                                    for n, t in stored.items()):
            raise ValueError(f"its layouts {layouts} do not fit its tensors")
        features = {n: t.permute(inverse_layout(layouts[n])) for n, t in stored.items()}  # the towers' strides
        self._check(features)
        crc = entry_checksum(features, meta)
        if crc != meta.get("crc32"):
            raise ValueError(f"checksum {crc} != {meta.get('crc32')} recorded")
        return Entry(features=features, info=json.loads(meta.get("info", "{}")))

    def _check(self, features: dict[str, torch.Tensor]) -> None:
        """The tensors an entry of these settings holds: one per tower of the modal, in the towers' dtype."""
        wanted = [n for n, used in zip(TENSORS, (self.settings.uses_video, self.settings.uses_audio)) if used]
        if sorted(features) != sorted(wanted):
            raise ValueError(f"it holds {sorted(features)}, expected {wanted}")
        dtypes = {str(t.dtype).removeprefix("torch.") for t in features.values()}
        if dtypes != {self.settings.dtype}:
            raise ValueError(f"its tensors are {sorted(dtypes)}, expected {self.settings.dtype}")

    def _drop(self, path: Path, reason: str) -> None:
        log.warning("tower cache: %s is damaged (%s); removing it, the clip's features are computed again and "
                    "rewritten", path, reason)
        aside = path.with_name(f".{path.name}.bad-{os.getpid()}-{threading.get_ident()}")
        with contextlib.suppress(OSError):  # another process may have removed (and rewritten) it already
            os.rename(path, aside)
            os.unlink(aside)

    # --- writing -----------------------------------------------------------------------------------------------
    @property
    def writable(self) -> bool:
        return self._write_error is None

    @property
    def write_error(self) -> str | None:
        """Why writing is off (None while it is on)."""
        return self._write_error

    def put(self, content: str, features: dict[str, torch.Tensor], info: dict | None = None) -> int:
        """Store one clip's features (tensors on any device; copied to the CPU); returns the bytes written, 0 when
        the entry was there already or writing is off."""
        self._check(features)
        if self._write_error is not None:
            return 0
        tensors = {name: features[name].detach().to("cpu") for name in TENSORS if name in features}
        layouts = {name: layout(t) for name, t in tensors.items()}
        meta = {"key": self.settings.key(content), "format": str(FORMAT), "layout": json.dumps(layouts),
                "info": json.dumps(info or {})}
        meta["crc32"] = entry_checksum(tensors, meta)
        data = save({name: t.permute(layouts[name]).contiguous() for name, t in tensors.items()}, metadata=meta)
        path = self.path(content)
        try:
            path.parent.mkdir(exist_ok=True)
            published = write_new(path, data)
        except OSError as e:
            self._stop_writing(e)
            return 0
        if not published:
            self._counter.add(already_there=1)
            return 0
        self._counter.add(written=1, bytes_written=len(data))
        return len(data)

    def _stop_writing(self, error: OSError) -> None:
        with self._counter.lock:
            first = self._write_error is None
            self._write_error = error.strerror or str(error)
            self._counter.stats.write_failures += 1
        if first:
            log.warning("tower cache: cannot write to %s (%s); the run goes on without storing features (the "
                        "entries already there are still read)", self.dir, self._write_error)

    # --- bookkeeping -------------------------------------------------------------------------------------------
    @property
    def stats(self) -> StoreStats:
        with self._counter.lock:
            return StoreStats(**self._counter.stats.as_dict())

    def clean_leftovers(self, older_than_s: float = 3600.0) -> int:
        """Remove temporary files that writers killed mid-write left (older than `older_than_s`, so a live
        writer's is never touched); returns how many."""
        removed, limit = 0, time.time() - older_than_s
        for tmp in self.dir.glob("*/.*"):
            with contextlib.suppress(OSError):
                if tmp.stat().st_mtime < limit:
                    tmp.unlink()
                    removed += 1
        return removed


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StoreError(f"tower cache: cannot read {path} ({e})") from None
    if not isinstance(value, dict):
        raise StoreError(f"tower cache: {path} is not a JSON object")
    return value
