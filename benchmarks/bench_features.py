"""The feature store's format: loading a batch of 8-64 clips' tower features, one file per clip (the store) against
safetensors shards of 16 clips, with the page cache warm and cold; and the store's write rate.

    python benchmarks/bench_features.py                 # R1-Omni-0.5B's shapes, 64 clips, bfloat16
    python benchmarks/bench_features.py --quick         # tiny shapes (a smoke run; numbers mean nothing)

A clip's entry is what the model consumes before the projectors, at the 0.5B shape: SigLIP layer features
(8, 196, 768) and pooled Whisper features (500, 1280), in bfloat16 (the towers' training dtype): 3.69 MB. Each
row reads a random batch of clips (training reads them in a shuffled order) and checks each clip's CRC-32, as the
store does: "file" is FeatureStore.get (memory-mapped, checksum, key and dtype checks), "shard16" opens each
needed 16-clip shard once (safe_open) and reads the clip's two tensors from it. Cold: every file is dropped from
the page cache first (posix_fadvise DONTNEED after an fsync), so the rows read the disk. With --device cuda the
batch is also stacked and copied to the GPU, as the trainer receives it. The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common import emit
from omni_fast.features.key import FeatureSettings
from omni_fast.features.store import FeatureStore

SHARD = 16


def _settings(dtype: torch.dtype) -> FeatureSettings:
    return FeatureSettings(towers="bench", dtype=str(dtype).removeprefix("torch."), device="cuda", media="pyav+swr",
                           preprocess=1, num_frames=8, aspect="pad", modal="video_audio", n_mels=128)


def _drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _read_files(store: FeatureStore, contents: list[str]) -> list[dict]:
    out = []
    for c in contents:
        entry = store.get(c)
        assert entry is not None
        out.append(entry.features)
    return out


def _read_shards(shards: Path, ids: list[int]) -> list[dict]:
    handles, out = {}, []
    for i in ids:
        f = handles.get(i // SHARD)
        if f is None:
            f = handles[i // SHARD] = safe_open(str(shards / f"shard{i // SHARD}.safetensors"), framework="pt")
        feats = {k: f.get_tensor(f"{i}.{k}") for k in ("vision", "audio")}
        crc = 0
        for t in feats.values():
            crc = zlib.crc32(t.view(-1).view(torch.uint8).numpy(), crc)
        out.append(feats)
    return out


def _to_device(batch: list[dict], device: torch.device) -> None:
    if device.type == "cuda":
        for k in ("vision", "audio"):
            torch.stack([f[k] for f in batch]).to(device, non_blocking=True)
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, 16 clips, 1 repeat: a smoke test")
    p.add_argument("--clips", type=int, default=64, help="clips in the store")
    p.add_argument("--repeats", type=int, default=7, help="timed batches per row (median)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dir", default=None, help="where the files are written (default: a temporary folder)")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = 16 if args.quick else args.clips
    repeats = 1 if args.quick else args.repeats
    shape_v, shape_a = ((8, 196, 32), (500, 48)) if args.quick else ((8, 196, 768), (500, 1280))
    batches = [b for b in (8, 32, 64) if b <= n]
    root = Path(tempfile.mkdtemp(prefix="bench_features-", dir=args.dir))
    try:
        store = FeatureStore(root / "store", _settings(torch.bfloat16))
        g = torch.Generator().manual_seed(0)
        clips = [{"vision": torch.randn(*shape_v, generator=g).bfloat16(),
                  "audio": torch.randn(*shape_a, generator=g).bfloat16()} for _ in range(n)]
        contents = [f"{i:064x}" for i in range(n)]
        t0 = time.perf_counter()
        nbytes = sum(store.put(c, f) for c, f in zip(contents, clips))
        write_s = time.perf_counter() - t0
        shards = root / "shards"
        shards.mkdir()
        for s in range(0, n, SHARD):
            save_file({f"{i}.{k}": v for i in range(s, min(s + SHARD, n)) for k, v in clips[i].items()},
                      str(shards / f"shard{s // SHARD}.safetensors"))
        files = sorted(store.dir.glob("*/*.safetensors")) + sorted(shards.glob("*.safetensors"))
        per_clip = nbytes / n
        print(f"# {n} clips, {per_clip / 1e6:.2f} MB per clip (vision {shape_v} + audio {shape_a}, bfloat16); store "
              f"written at {nbytes / write_s / 1e9:.2f} GB/s ({1e3 * write_s / n:.2f} ms per clip, page cache); "
              f"device {device}; files in {root}", flush=True)
        rng = random.Random(0)
        rows, records = [], []
        for b in batches:
            for cache in ("cold", "warm"):
                times = {"file": [], "shard16": []}
                for _ in range(repeats):  # both layouts on the same clips, one after the other
                    ids = rng.sample(range(n), b)
                    for layout, read in (("file", lambda: _read_files(store, [contents[i] for i in ids])),
                                         ("shard16", lambda: _read_shards(shards, ids))):
                        _drop_cache(files) if cache == "cold" else read()  # warm: the same batch once beforehand
                        t = time.perf_counter()
                        _to_device(read(), device)
                        times[layout].append(time.perf_counter() - t)
                for layout, ts in times.items():
                    ms = 1e3 * statistics.median(ts)
                    gbps = b * per_clip / (ms * 1e-3) / 1e9
                    rows.append([b, cache, layout, ms, ms / b, gbps])
                    records.append({"batch": b, "cache": cache, "layout": layout, "ms": ms, "ms_per_clip": ms / b,
                                    "GBps": gbps})
        emit("features", ["batch", "cache", "layout", "ms", "ms/clip", "GB/s"], rows,
                            {"device": str(device), "quick": args.quick, "clips": n, "bytes_per_clip": per_clip,
                             "write_GBps": nbytes / write_s / 1e9, "write_ms_per_clip": 1e3 * write_s / n,
                             "rows": records}, args.out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
