"""Media loading throughput: clips/s and source frames/s for PyAV with 1 and N worker threads and for DALI.

    python benchmarks/bench_media.py                  # DFEW/MAFW-like clips on this machine's device
    python benchmarks/bench_media.py --quick          # a few tiny clips (CPU smoke test; numbers mean nothing)

Clips are synthetic and shaped like DFEW/MAFW: 640x360, 2-5 s, 25 or 30 fps (make_clip's smooth colour field
with a moving square; real footage costs the decoder more). On a GPU they are h264 + AAC mp4 (what the
datasets hold; DALI decodes the video with NVDEC, PyAV the AAC). Without a GPU DALI can only run its CPU
video decoder, which reads VP8/VP9/MJPEG, so the CPU run uses VP9 webm with a wav beside each clip (audio is
decoded by PyAV on every backend), for every backend alike. Each backend runs the same MediaLoader (batch,
prefetch) over the same clips: one warm-up pass, then --repeats timed passes, median reported. frames/s counts
the clips' source frames N (the video a loader gets through), not the 8 sampled per clip.

Tower-feature store rows (omni_fast/features/, same run, same loader): "store cold" is the PyAV xN loader asking
an empty store about every clip first (hashing the file, a miss) and then decoding it, as a run with a cold
store does; "store warm" finds every clip in the store (an entry of the R1-Omni-0.5B shape, 3.69 MB in bf16)
and decodes nothing: the batch's features are read, checked and stacked onto the device, which is all a warm
run's media phase does. The store lives in a temporary folder on the clips' disk (--store-dir to choose). The
last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from omni_fast.config import LoaderConfig
from omni_fast.data import Record, with_sidecar_audio
from omni_fast.features.key import FeatureSettings, content_hash
from omni_fast.features.store import FeatureStore
from omni_fast.media import dali as mdali
from omni_fast.media.loader import MediaLoader
from omni_fast.media.pyav import frame_count
from omni_fast.testing import make_clip, make_wav


def make_clips(directory: Path, count: int, size: tuple[int, int], codec: str, seconds: tuple[float, ...],
               wav: bool) -> list[Record]:
    """`count` clips cycling through `seconds` and 25/30 fps, made once and reused from `directory`."""
    suffix = {"h264": ".mp4", "vp9": ".webm"}[codec]
    directory.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        secs, fps = seconds[i % len(seconds)], (25, 30)[i % 2]
        path = directory / f"clip{i:03d}_{size[0]}x{size[1]}_{secs}s_{fps}fps{suffix}"
        if not path.is_file():
            make_clip(path, seconds=secs, fps=fps, size=size, codec=codec, seed=i)
        if wav and not path.with_suffix(".wav").is_file():
            make_wav(path.with_suffix(".wav"), seconds=secs, sample_rate=48000, seed=i)
        records.append(Record(video=path, label="neutral", index=i, source="dfew"))
    return with_sidecar_audio(records) if wav else records


def time_loader(records: list[Record], config: LoaderConfig, device: torch.device, repeats: int) -> float:
    """Median seconds for one pass over all records (after one warm-up pass), synchronised on the device."""
    def one_pass() -> float:
        t0 = time.perf_counter()
        for batch in MediaLoader(records, config, device):
            assert not batch.failures, batch.failures
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    one_pass()
    return statistics.median(one_pass() for _ in range(repeats))


def time_store(records: list[Record], config: LoaderConfig, device: torch.device, repeats: int,
               directory: Path, quick: bool) -> dict[str, float]:
    """Median seconds per pass of the loader in front of a tower-feature store: cold (every lookup a miss, every
    clip decoded) and warm (every clip found, its features stacked onto the device)."""
    settings = FeatureSettings(towers="bench_media", dtype="bfloat16", device=device.type, media="pyav+swr",
                               preprocess=1, num_frames=config.num_frames, aspect=config.aspect, modal="video_audio",
                               n_mels=config.n_mels)
    cold, warm = FeatureStore(directory / "cold", settings), FeatureStore(directory / "warm", settings)
    shapes = ((8, 196, 32), (500, 48)) if quick else ((8, 196, 768), (500, 1280))
    for r in records:
        warm.put(content_hash(r), {"vision": torch.randn(*shapes[0]).bfloat16(),
                                   "audio": torch.randn(*shapes[1]).bfloat16()})

    def lookup(store: FeatureStore):
        return lambda record: store.get(content_hash(record))

    def warm_batch(batch) -> None:
        for name in ("vision", "audio"):
            torch.stack([e.features[name] for e in batch.found]).to(device, non_blocking=True)

    out = {}
    for name, store in (("store cold", cold), ("store warm", warm)):
        def one_pass() -> float:
            t0 = time.perf_counter()
            for batch in MediaLoader(records, config, device, lookup=lookup(store)):
                assert not batch.failures, batch.failures
                assert (len(batch.decoded) == len(batch)) == (store is cold)
                if store is warm:
                    warm_batch(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - t0

        one_pass()
        out[name] = statistics.median(one_pass() for _ in range(repeats))
    assert not _entries(cold), "the cold store is only asked, never filled here"
    return out


def _entries(store: FeatureStore) -> list[Path]:
    return list(store.dir.glob("*/*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="6 tiny clips, 1 repeat: a smoke test, not a measurement")
    p.add_argument("--clips", type=int, default=None, help="clips per pass (default 64 on a GPU, 24 on the CPU)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=None, help="the N of 'PyAV xN' (default: all cores)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--clip-dir", default=None, help="where the synthetic clips are made and kept")
    p.add_argument("--codec", choices=["auto", "h264", "vp9"], default="auto",
                   help="auto: h264 + aac on a GPU (or without DALI), vp9 + wav for CPU-only DALI")
    p.add_argument("--store-dir", default=None, help="where the tower-feature store rows keep their store "
                   "(default: a temporary folder beside the clips)")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    dali_ok = mdali.available()
    codec = args.codec if args.codec != "auto" else "h264" if gpu or not dali_ok else "vp9"
    size, seconds = ((160, 90), (1.0,)) if args.quick else ((640, 360), (2.0, 3.0, 4.0, 5.0))
    count = args.clips or (6 if args.quick else 64 if gpu else 24)
    repeats = 1 if args.quick else args.repeats
    workers = args.workers or os.cpu_count() or 1
    clip_dir = Path(args.clip_dir or f"/tmp/omni_fast_bench_media/{codec}_{size[0]}x{size[1]}")
    t0 = time.perf_counter()
    records = make_clips(clip_dir, count, size, codec, seconds, wav=codec == "vp9")
    src_frames = sum(frame_count(r.video) for r in records)
    print(f"# {count} clips {size[0]}x{size[1]} {codec}{' + wav' if codec == 'vp9' else ' + aac'}, "
          f"{src_frames} source frames, made/checked in {time.perf_counter() - t0:.1f} s; device {device}, "
          f"{os.cpu_count()} cores, batch {args.batch_size}", flush=True)

    runs = [("pyav x1", LoaderConfig(batch_size=args.batch_size, backend="pyav", workers=1)),
            (f"pyav x{workers}", LoaderConfig(batch_size=args.batch_size, backend="pyav", workers=workers))]
    if not dali_ok:
        print("# DALI: not installed (pip install 'omni-fast[dali]'); DALI rows skipped", flush=True)
    elif codec == "h264" and not gpu:
        dali_ok = False
        print("# DALI: its CPU-only decoder cannot read h264; DALI rows skipped (use --codec vp9)", flush=True)
    else:
        runs.append(("dali", LoaderConfig(batch_size=args.batch_size, backend="dali", workers=workers,
                                          dali_threads=workers)))

    print(f"{'backend':<12}{'s/pass':>10}{'clips/s':>10}{'frames/s':>11}{'ms/clip':>10}{'s/256 clips':>13}")
    results = {}
    for name, config in runs:
        s = time_loader(records, config, device, repeats)
        row = {"s_per_pass": s, "clips_per_s": count / s, "src_frames_per_s": src_frames / s,
               "ms_per_clip": 1e3 * s / count, "s_per_256_clips": 256 * s / count}
        results[name] = row
        print(f"{name:<12}{s:>10.3f}{row['clips_per_s']:>10.1f}{row['src_frames_per_s']:>11.0f}"
              f"{row['ms_per_clip']:>10.1f}{row['s_per_256_clips']:>13.2f}", flush=True)
    summary = {"bench": "media", "device": str(torch.cuda.get_device_name(device) if gpu else "cpu"),
               "cores": os.cpu_count(), "clips": count, "size": list(size), "codec": codec,
               "src_frames": src_frames, "batch_size": args.batch_size, "quick": args.quick,
               "dali": dali_ok, "rows": [{"backend": name, **row} for name, row in results.items()]}
    store_config = LoaderConfig(batch_size=args.batch_size, backend="pyav", workers=workers)
    with tempfile.TemporaryDirectory(prefix="store-", dir=args.store_dir or clip_dir) as store_dir:
        for name, s in time_store(records, store_config, device, repeats, Path(store_dir), args.quick).items():
            row = {"s_per_pass": s, "clips_per_s": count / s, "src_frames_per_s": src_frames / s,
                   "ms_per_clip": 1e3 * s / count, "s_per_256_clips": 256 * s / count}
            results[name] = row
            summary["rows"].append({"backend": name, **row})
            print(f"{name:<12}{s:>10.3f}{row['clips_per_s']:>10.1f}{row['src_frames_per_s']:>11.0f}"
                  f"{row['ms_per_clip']:>10.1f}{row['s_per_256_clips']:>13.2f}", flush=True)
    summary["store_warm_speedup_vs_cold"] = results["store cold"]["s_per_pass"] / results["store warm"]["s_per_pass"]
    print(f"# tower-feature store: a warm pass is {summary['store_warm_speedup_vs_cold']:.1f}x faster than a cold "
          f"one (pyav x{workers}, same clips, same run)")
    if dali_ok:
        summary["dali_speedup_vs_pyav_x1"] = results["pyav x1"]["s_per_pass"] / results["dali"]["s_per_pass"]
        print(f"# DALI per clip: {summary['dali_speedup_vs_pyav_x1']:.2f}x single-worker PyAV (target on a GPU: 5x)")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
