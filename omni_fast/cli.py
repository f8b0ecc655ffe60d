"""omni-fast command line: infer (the reference inference.py's arguments), eval (WAR/UAR), train, export, serve,
cache-features and demo.

    omni-fast infer --model_path R1-Omni-0.5B --video_path clip.mp4 --modal video_audio --instruct "..."
    omni-fast eval --model_path R1-Omni-0.5B --annotations DFEW_val.json --data_root /data --out results.json
    omni-fast train --config grpo.yaml [--key value ...] [--resume_from_checkpoint PATH|latest]
    omni-fast export --merge output_dir/checkpoint-500 --out R1-Omni-LoRA-merged   # a LoRA run's adapter merged
    omni-fast serve --model_path R1-Omni-0.5B [--port 8000] [--api_key KEY] [--allowed_local_media_path DIR] [--ui]
        [--tower_cache_dir DIR]
    omni-fast cache-features --annotations train.json --video_root /data --model_path R1-Omni-0.5B \
        --tower_cache_dir /fast/tower-cache [--aspect pad|stretch]
    omni-fast demo [--serve]

Every --snake_case flag is also accepted as --kebab-case (--model-path). Errors are one line on stderr with
exit status 2; Ctrl-C exits with status 130, keeping every result already written.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

DEMO_GRPO_STEPS = 30
DEMO_SFT_STEPS = 40
# --dtype's spellings -> omni_fast.devices.DTYPES's names (kept torch-free so --help stays fast)
DTYPE_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
               "float32": "float32", "fp32": "float32"}


def _dtype(name: str | None):
    from omni_fast.devices import DTYPES

    return None if name is None else DTYPES[DTYPE_NAMES[name]]


def _flag(p: argparse.ArgumentParser, name: str, **kw) -> None:
    """An option under its snake_case name (the reference's spelling) and its kebab-case twin."""
    names = [name] + ([name.replace("_", "-")] if "_" in name else [])
    p.add_argument(*names, **kw)


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """Where the checkpoint's parts are read from and where it runs (infer, eval, cache-features)."""
    _flag(p, "--bert_path", default=None, help="local bert-base-uncased directory (config.json, vocab.txt); "
          "default: <model_path>/bert-base-uncased or ./bert-base-uncased")
    _flag(p, "--vision_tower", default=None, help="override config.json's mm_vision_tower directory")
    _flag(p, "--audio_tower", default=None, help="override config.json's mm_audio_tower directory")
    _flag(p, "--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    _add_checkpoint_args(p)
    _flag(p, "--dtype", default=None, choices=sorted(DTYPE_NAMES),
          help="default: fp16 on a GPU (the reference's inference dtype, towers included), fp32 on the CPU")
    _flag(p, "--media_backend", default="pyav", choices=["pyav", "dali", "auto"],
          help="clip decoding: pyav (the reference's frames exactly), dali (NVDEC on a GPU), auto")
    _flag(p, "--media_workers", type=int, default=4, help="decode threads")
    _flag(p, "--tower_cache_dir", default=None,
          help="a tower-feature store (omni-fast cache-features --aspect stretch): clips found there skip decoding "
               "and both towers, the others are added to it; the results are the same")
    _flag(p, "--encoder_cache_bytes", type=int, default=1 << 30,
          help="host memory keeping clips' tower features for a clip given again (0: none); the results are the same")
    _flag(p, "--max_num_seqs", type=int, default=256, help="sample rows the engine decodes at once")
    _flag(p, "--max_num_batched_tokens", type=int, default=2048, help="prompt positions prefilled per engine step")
    _flag(p, "--kv_cache_memory", type=int, default=None,
          help="bytes of the engine's KV pool (default: --gpu_memory_utilization on a GPU, 2 GiB on the CPU)")
    _flag(p, "--gpu_memory_utilization", type=float, default=0.9,
          help="fraction of the GPU the weights, activations and KV pool may fill")
    _flag(p, "--no_cuda_graphs", action="store_true", help="decode eagerly (no CUDA graph capture)")


def _load_model(args: argparse.Namespace, device=None):
    """OmniModel.from_pretrained with the model, engine and media arguments of infer / eval."""
    from omni_fast.api import OmniModel
    from omni_fast.config import EngineConfig, LoaderConfig

    return OmniModel.from_pretrained(
        args.model_path, device if device is not None else args.device, _dtype(args.dtype), bert_path=args.bert_path,
        vision_tower=args.vision_tower, audio_tower=args.audio_tower,
        engine_config=EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                   kv_cache_memory=args.kv_cache_memory,
                                   gpu_memory_utilization=args.gpu_memory_utilization,
                                   cuda_graphs=not args.no_cuda_graphs),
        loader_config=LoaderConfig(backend=args.media_backend, workers=args.media_workers, prefetch=1),
        tower_cache_dir=args.tower_cache_dir, encoder_cache_bytes=args.encoder_cache_bytes)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default, and keeps the train command's list of config fields as written."""


def build_parser() -> argparse.ArgumentParser:
    from omni_fast import __version__

    parser = argparse.ArgumentParser(prog="omni-fast", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"omni-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    infer = sub.add_parser("infer", formatter_class=_Formatter,
                           help="recognise the emotion in clips, as R1-Omni's inference.py")
    _flag(infer, "--model_path", required=True, help="HumanOmni / R1-Omni checkpoint directory")
    _flag(infer, "--video_path", required=True, nargs="+", help="one or more clips")
    _flag(infer, "--modal", default="video_audio", choices=["video_audio", "video", "audio"])
    _flag(infer, "--instruct", default=None, help="the question (default: R1-Omni's demo instruct)")
    _flag(infer, "--max_new_tokens", type=int, default=2048, help="the reference's mm_infer value")
    _flag(infer, "--batch_size", type=int, default=8)
    _flag(infer, "--on_error", default="raise", choices=["raise", "skip"],
          help="a clip that cannot be decoded: stop with its error, or skip it (named on stderr)")
    _flag(infer, "--json", action="store_true",
          help="print one JSON object per clip, with that clip's timings (its share of its batch)")
    _add_model_args(infer)

    ev = sub.add_parser("eval", formatter_class=_Formatter,
                        help="WAR / UAR over an annotation file (DFEW, MAFW, RAVDESS formats)",
                        description="Each clip's result is appended to OUT's .jsonl twin as soon as it is done; "
                                    "the same command run again resumes from it (--overwrite starts over). "
                                    "The scores go to OUT, the confusion matrix to OUT's .confusion.png.")
    _flag(ev, "--model_path", required=True, help="HumanOmni / R1-Omni checkpoint directory")
    _flag(ev, "--annotations", required=True, help="annotation JSON / JSONL (R1-Omni or RAVDESS format)")
    _flag(ev, "--data_root", default=None, help="what relative video paths are resolved against "
          "(default: the annotation file's folder)")
    _flag(ev, "--instruct", default=None, help="the question (default: the reference eval script's prompt)")
    _flag(ev, "--modal", default="video_audio", choices=["video_audio", "video", "audio"])
    _flag(ev, "--max_new_tokens", type=int, default=2048, help="the reference eval's (mm_infer's) value")
    _flag(ev, "--batch_size", type=int, default=8)
    _flag(ev, "--limit", type=int, default=None, help="score only the first N clips")
    _flag(ev, "--out", default=None, help="the scores as JSON; per-clip results stream to its .jsonl twin "
          "(without --out nothing is saved and nothing can be resumed)")
    _flag(ev, "--overwrite", action="store_true", help="start over instead of resuming from --out's results")
    _flag(ev, "--label_set", default="auto",
          help="labels scored per dataset: auto (DFEW's 7 / MAFW's 11 / RAVDESS's 8; a file with none of them "
               "is scored over its own labels), none (every label is a class), or a comma-separated list")
    _flag(ev, "--no_progress", action="store_true", help="no progress bar on stderr")
    _add_model_args(ev)

    train = sub.add_parser("train", formatter_class=_Formatter,
                           help="GRPO (or the cold-start SFT stage) from a YAML / JSON config",
                           description="Any GRPOConfig field can be given as --key value after the config file "
                                       "(e.g. --max_steps 100 --learning_rate 1e-6); it overrides the file.",
                           epilog=_config_fields())
    _flag(train, "--config", default=None, help="YAML or JSON file of GRPOConfig fields")
    _flag(train, "--resume_from_checkpoint", default=None,
          help="a checkpoint-<step> directory, or 'latest' (the newest one in output_dir)")

    export = sub.add_parser("export", formatter_class=_Formatter,
                            help="a HumanOmni checkpoint from a training checkpoint (--merge: a LoRA run's adapter "
                                 "merged into its base model)",
                            description="Writes what OmniModel.from_pretrained and the reference code load: the "
                                        "weights, config, tokenizer and BERT files, without the trainer's state.")
    export.add_argument("checkpoint", help="a checkpoint-<step> directory of omni-fast train (or a PEFT adapter "
                                           "directory written by it)")
    _flag(export, "--out", required=True, help="the checkpoint directory to write")
    _flag(export, "--merge", action="store_true",
          help="merge the LoRA adapter (W + lora_alpha / lora_r x B A, in float32) into the base model")
    _flag(export, "--model_path", default=None,
          help="the base model of a LoRA checkpoint; None: the one its adapter_config.json names")
    _flag(export, "--bert_path", default=None, help="the base model's BERT directory; None: its own")
    _flag(export, "--dtype", default=None, choices=sorted(DTYPE_NAMES),
          help="the dtype the weights are written in; None: the checkpoint's torch_dtype")
    _flag(export, "--overwrite", action="store_true", help="replace --out if it is a checkpoint")

    _add_serve_parser(sub)
    _add_cache_features_parser(sub)

    demo = sub.add_parser("demo", formatter_class=_Formatter,
                          help="tiny checkpoint in the real format + a synthetic clip, end to end")
    _flag(demo, "--workdir", default=None, help="where to write the tiny checkpoint and clip (default: temp)")
    _flag(demo, "--max_new_tokens", type=int, default=48)
    _flag(demo, "--grpo_steps", type=int, default=DEMO_GRPO_STEPS, help="GRPO steps of the toy run (0: skip)")
    _flag(demo, "--sft_steps", type=int, default=DEMO_SFT_STEPS, help="SFT steps before the GRPO run")
    _flag(demo, "--serve", action="store_true",
          help="instead of the recognition and training stages, serve the tiny checkpoint with the page on "
               "(omni-fast serve --ui) until Ctrl-C")
    _flag(demo, "--port", type=int, default=8000, help="with --serve: the port on 127.0.0.1 (0: a free one)")
    return parser


def _add_cache_features_parser(sub) -> None:
    cache = sub.add_parser("cache-features", formatter_class=_Formatter,
                           help="compute the frozen towers' features of every clip once, into a feature store",
                           description="Fills --tower_cache_dir with each clip's SigLIP and Whisper features (before "
                                       "the projectors), for train / eval / infer runs given the same directory. "
                                       "Data-parallel under torchrun; run it again to finish an interrupted run.")
    _flag(cache, "--annotations", required=True, help="annotation JSON / JSONL (R1-Omni or RAVDESS format)")
    _flag(cache, "--video_root", default=None, help="what relative video paths are resolved against "
          "(default: the annotation file's folder)")
    _flag(cache, "--model_path", required=True, help="HumanOmni / R1-Omni checkpoint directory (its towers)")
    _flag(cache, "--tower_cache_dir", required=True, help="the feature store (created if absent)")
    _flag(cache, "--aspect", default="pad", choices=["pad", "stretch"],
          help="frames as training makes them (pad) or as infer / eval make them (stretch)")
    _flag(cache, "--modal", default="video_audio", choices=["video_audio", "video", "audio"],
          help="which towers' features (training uses both)")
    _flag(cache, "--batch_size", type=int, default=8, help="clips per tower batch")
    _flag(cache, "--no_progress", action="store_true", help="no progress bar on stderr")
    _add_checkpoint_args(cache)
    # the run the store is for decides the next two defaults: train (pad) or infer / eval (stretch)
    _flag(cache, "--dtype", default=None, choices=sorted(DTYPE_NAMES),
          help="the dtype the towers run in; default: the reading run's (pad: bf16 on a GPU as train; stretch: fp16 "
               "on a GPU as infer / eval; fp32 on the CPU)")
    _flag(cache, "--media_backend", default=None, choices=["pyav", "dali", "auto"],
          help="clip decoding; default: the reading run's (pad: auto as train; stretch: pyav as infer / eval)")
    _flag(cache, "--media_workers", type=int, default=4, help="decode threads")


def _add_serve_parser(sub) -> None:
    """omni-fast serve: vLLM's option names wherever the concept is the same."""
    from omni_fast.serve.config import ServeConfig

    d = ServeConfig()
    serve = sub.add_parser("serve", formatter_class=_Formatter,
                           help="an OpenAI-compatible server (POST /v1/chat/completions with video / audio parts)",
                           description="Serves /v1/chat/completions, /v1/models, /health and /metrics until SIGTERM "
                                       "or Ctrl-C, which drain the running requests first.")
    _flag(serve, "--model_path", required=True, help="HumanOmni / R1-Omni checkpoint directory")
    _flag(serve, "--bert_path", default=None, help="local bert-base-uncased directory (config.json, vocab.txt); "
          "default: <model_path>/bert-base-uncased or ./bert-base-uncased")
    _flag(serve, "--host", default=d.host, help="address to bind (0.0.0.0: every interface)")
    _flag(serve, "--port", type=int, default=d.port, help="TCP port (0: a free one, printed at startup)")
    _flag(serve, "--served_model_name", default=None, help="the model name clients send (default: --model_path)")
    _flag(serve, "--api_key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    _flag(serve, "--allowed_local_media_path", default=None,
          help="let requests name local files (file:// URLs or paths) under this directory only")
    _flag(serve, "--allowed_media_domains", nargs="+", default=[], metavar="HOST",
          help="let requests name http(s) URLs on these hosts (default: no remote fetch)")
    _flag(serve, "--max_num_seqs", type=int, default=d.max_num_seqs,
          help="sample rows the engine runs at once (a request's n may not exceed it)")
    _flag(serve, "--kv_cache_memory", type=int, default=None, metavar="BYTES",
          help="bytes of KV cache the engine pools (default: the engine's own sizing)")
    _flag(serve, "--max_request_bytes", type=int, default=d.max_request_bytes,
          help="largest request body (413 above it), and largest fetched media file")
    _flag(serve, "--max_clip_seconds", type=float, default=d.max_clip_seconds, help="longest clip accepted")
    _flag(serve, "--max_queue", type=int, default=d.max_queue,
          help="requests waiting for their first token at once; one more gets 429 with Retry-After")
    _flag(serve, "--request_timeout", type=float, default=d.request_timeout,
          help="seconds a request may take from arrival to its last token (then it is aborted); also how long "
               "SIGTERM waits for running requests")
    _flag(serve, "--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    _flag(serve, "--dtype", default=None, choices=sorted(DTYPE_NAMES),
          help="default: fp16 on a GPU (the reference's inference dtype, towers included), fp32 on the CPU")
    _flag(serve, "--ui", action="store_true",
          help="also serve a page at /ui to try the model in a browser (needs the `ui` extra: Gradio)")
    _flag(serve, "--tower_cache_dir", default=None,
          help="a tower-feature store (omni-fast cache-features --aspect stretch): clips found there skip decoding "
               "and both towers, the others are added to it; the answers are the same")
    _flag(serve, "--no_enable_prefix_caching", action="store_true",
          help="no request reuses an earlier prompt's KV (vLLM's flag; a baseline for benchmarks)")
    _flag(serve, "--encoder_cache_bytes", type=int, default=1 << 30,
          help="host memory that keeps clips' tower features across requests, least recently used out (0: none)")


def cmd_serve(args: argparse.Namespace) -> int:
    from omni_fast.config import EngineConfig
    from omni_fast.serve.config import ServeConfig

    if args.ui:
        _check_ui_installed()
    config = ServeConfig(host=args.host, port=args.port, served_model_name=args.served_model_name or args.model_path,
                         api_key=args.api_key, allowed_local_media_path=args.allowed_local_media_path,
                         allowed_media_domains=tuple(args.allowed_media_domains), max_num_seqs=args.max_num_seqs,
                         max_request_bytes=args.max_request_bytes, max_clip_seconds=args.max_clip_seconds,
                         max_queue=args.max_queue, request_timeout=args.request_timeout, ui=args.ui,
                         enable_prefix_caching=not args.no_enable_prefix_caching)
    engine = EngineConfig(max_num_seqs=args.max_num_seqs, kv_cache_memory=args.kv_cache_memory)
    if args.encoder_cache_bytes < 0:
        raise ValueError(f"--encoder_cache_bytes {args.encoder_cache_bytes}: expected a number of bytes >= 0 (0: none)")
    return _serve(args.model_path, args.bert_path, config, engine, args.device, args.dtype, args.tower_cache_dir,
                  args.encoder_cache_bytes)


def _serve(model_path, bert_path, config, engine_config=None, device=None, dtype=None, tower_cache_dir=None,
           encoder_cache_bytes: int = 1 << 30) -> int:
    """Load the model and serve it (with the page's sample clips, written to a temporary directory, when the page
    is on) until SIGTERM / Ctrl-C. engine_config None: the engine's defaults."""
    from omni_fast.api import OmniModel
    from omni_fast.serve.server import serve

    t0 = time.perf_counter()
    model = OmniModel.from_pretrained(model_path, device, _dtype(dtype), bert_path=bert_path,
                                      engine_config=engine_config, tower_cache_dir=tower_cache_dir,
                                      encoder_cache_bytes=encoder_cache_bytes)
    print(f"omni-fast serve: model loaded in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="omni-fast-samples-") as tmp:
        return serve(model, config, samples=_page_samples(Path(tmp)) if config.ui else ())


def _check_ui_installed() -> None:
    """Before anything loads: --ui without Gradio is a one-line error naming the extra."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise ValueError('--ui needs Gradio: pip install -e ".[ui]" (the `ui` extra)')


def _page_samples(directory: Path) -> list:
    """The page's sample clips, made by omni_fast.testing's synthetic clip makers (so the page works with any
    checkpoint, the demo's included, and without network)."""
    from omni_fast.serve.ui import Sample
    from omni_fast.testing import make_clip, make_wav

    return [Sample("clip 1: h264 + aac, 3 s", str(make_clip(directory / "sample-1.mp4", seconds=3.0))),
            Sample("clip 2: h264 + aac, 2 s", str(make_clip(directory / "sample-2.mp4", seconds=2.0, size=(224, 160),
                                                             seed=1))),
            Sample("clip 3: silent video + a wav", str(make_clip(directory / "sample-3.mp4", seconds=2.0,
                                                                 audio=False, seed=2)),
                   str(make_wav(directory / "sample-3.wav", seconds=2.0, seed=2)))]


def _config_fields() -> str:
    from omni_fast.config import GRPOConfig

    lines = ["GRPOConfig fields (default; None: the stage's recipe value):"]
    for name, default, comment in GRPOConfig.describe():
        shown = list(default) if isinstance(default, tuple) else default
        lines.append(f"  {name} = {shown!r}: {comment}")
    return "\n".join(lines)


def parse_overrides(extra: list[str]) -> dict[str, str | None]:
    """["--key", "value", "--flag=value", ...] -> {"key": "value", ...}; a bare --flag gives None (true for a
    bool field, an error naming the flag for any other)."""
    out, i = {}, 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"unexpected argument {arg!r}: expected --key value pairs of GRPOConfig fields")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")  # --max-steps is --max_steps
        if not eq:
            if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                value, i = extra[i + 1], i + 1
            else:
                value = None
        out[key] = value
        i += 1
    return out


def cmd_train(args: argparse.Namespace, extra: list[str], argv: list[str]) -> int:
    from omni_fast.config import GRPOConfig
    from omni_fast.grpo.trainer import Trainer
    from omni_fast.interrupt import signal_name

    from omni_fast import distributed

    config = GRPOConfig.from_file(args.config, parse_overrides(extra))
    trainer = Trainer(config, args.resume_from_checkpoint)
    start = trainer.pos.step
    history = trainer.train()
    distributed.shutdown(trainer.dist)
    if not trainer.dist.is_main:
        return 128 + trainer.stop_signal if trainer.stop_signal else 0
    if trainer.pos.step == start:
        print(f"nothing to train: the run is complete at step {trainer.pos.step} of {trainer.total_steps}; "
              f"checkpoint: {trainer.last_checkpoint}")
        return 0
    last = history[-1] if history else {}
    shown = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "reward", "rewards/accuracy_reward") if k in last)
    if trainer.stop_signal:
        print(f"omni-fast train: stopped by {signal_name(trainer.stop_signal)} after step {trainer.pos.step} of "
              f"{trainer.total_steps}; checkpoint: {trainer.last_checkpoint}; resume with: {resume_command(argv)}",
              file=sys.stderr)
        return 128 + trainer.stop_signal
    print(f"trained {trainer.pos.step} steps ({shown}); checkpoint: {trainer.last_checkpoint}; "
          f"metrics: {trainer.out / 'metrics.jsonl'}")
    return 0


def resume_command(argv: list[str]) -> str:
    """The train command line that continues this run: the same arguments, resuming from the latest checkpoint."""
    import shlex

    args, i = [], 0
    while i < len(argv):
        key = argv[i].split("=", 1)[0].replace("-", "_")
        if key == "__resume_from_checkpoint":
            i += 1 if "=" in argv[i] else 2
            continue
        args.append(argv[i])
        i += 1
    return shlex.join(["omni-fast", *args, "--resume_from_checkpoint", "latest"])


def _infer_line(r, as_json: bool) -> str:
    """What infer prints for one clip: the text, as the reference does (for a skipped clip, one line saying so,
    so that the n-th answer stays the n-th clip's), or one JSON object with its timings."""
    if not as_json:
        if r.error is not None:  # a media error's message usually starts with the clip's path already
            said = " ".join(r.error.split())
            return f"[skipped {said if said.startswith(str(r.video)) else f'{r.video}: {said}'}]"
        return r.text
    return json.dumps({"video": r.video, "text": r.text, "reasoning": r.reasoning, "emotion": r.emotion,
                       "num_tokens": len(r.token_ids), "finish_reason": r.finish_reason, "error": r.error,
                       "features_from": r.features_from,
                       "timings": {k: v if isinstance(v, bool) else round(v, 4)
                                   for k, v in r.timings.as_dict().items()}}, ensure_ascii=False)


def cmd_export(args: argparse.Namespace) -> int:
    import dataclasses

    from omni_fast.model import lora
    from omni_fast.model.checkpoint import load_checkpoint, save_checkpoint

    path = Path(args.checkpoint).expanduser()
    dtype = DTYPE_NAMES[args.dtype] if args.dtype else None
    if (path / lora.ADAPTER_CONFIG).is_file():
        if not args.merge:
            raise ValueError(f"{path} holds a LoRA adapter, not a whole model: pass --merge to write it merged into "
                             "its base model")
        out = lora.merged_checkpoint(path, args.out, base=args.model_path, bert_path=args.bert_path,
                                     overwrite=args.overwrite, dtype=dtype)
    else:
        if args.merge:
            raise ValueError(f"{path}: --merge needs a LoRA checkpoint (with adapter_config.json); this one holds the "
                             "whole model (export it without --merge)")
        loaded = load_checkpoint(path, bert_path=args.bert_path, device="cpu")
        if dtype is not None:
            loaded = dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, torch_dtype=dtype))
        out = save_checkpoint(loaded, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from omni_fast.devices import resolve_device
    from omni_fast.task import DEFAULT_INSTRUCT

    _check_counts(args)
    resolve_device(args.device)
    if args.on_error == "raise":
        for v in args.video_path:
            if not Path(v).is_file():
                raise FileNotFoundError(f"--video_path {v}: no such file")
    t0 = time.perf_counter()
    model = _load_model(args)
    print(f"omni-fast infer: model loaded in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    instruct = args.instruct if args.instruct is not None else DEFAULT_INSTRUCT
    for r in model.recognize_iter(args.video_path, instruct, args.modal, args.max_new_tokens, args.batch_size,
                                  on_error=args.on_error):
        print(_infer_line(r, args.json), flush=True)
    return 0


def cmd_cache_features(args: argparse.Namespace) -> int:
    from omni_fast import distributed
    from omni_fast.config import INFER_DTYPE, LoaderConfig
    from omni_fast.features.key import FeatureSettings
    from omni_fast.features.precompute import SKIP_KINDS, cache_features
    from omni_fast.data import load_annotations
    from omni_fast.devices import resolve_device, resolve_dtype
    from omni_fast.features.store import FeatureStore
    from omni_fast.model.checkpoint import load_checkpoint

    if args.batch_size < 1:
        raise ValueError(f"--batch_size {args.batch_size}: expected >= 1")
    resolve_device(args.device)
    bad = []
    records = load_annotations(args.annotations, args.video_root, errors=bad)
    ctx = distributed.init(args.device)
    device = ctx.device
    # the dtype and decoder of the run that will read the store: train (pad) or infer / eval (stretch)
    dtype = resolve_dtype(_dtype(args.dtype), device, "bfloat16" if args.aspect == "pad" else INFER_DTYPE)
    backend = args.media_backend or ("auto" if args.aspect == "pad" else "pyav")
    t0 = time.perf_counter()
    loaded = load_checkpoint(args.model_path, bert_path=args.bert_path, vision_tower=args.vision_tower,
                             audio_tower=args.audio_tower, device=device, dtype=dtype)
    loader = LoaderConfig(batch_size=args.batch_size, backend=backend, workers=args.media_workers, prefetch=1,
                          aspect=args.aspect, num_frames=loaded.config.num_frames,
                          n_mels=loaded.model.towers.audio.num_mel_bins, audio=args.modal != "video")
    store = FeatureStore(args.tower_cache_dir, FeatureSettings.of(loaded.model, loader, device, args.modal))
    if ctx.is_main:
        store.clean_leftovers()
    summary = cache_features(records, loaded.model, store, loader, device, ctx, progress=not args.no_progress)
    distributed.shutdown(ctx)
    if not ctx.is_main:
        return 0
    summary.skipped = sorted(summary.skipped + [{"index": b.index, "path": b.path, "kind": "bad entry",
                                                 "reason": b.reason} for b in bad], key=lambda s: s["index"])
    for skip in summary.skipped:
        print(f"skipped entry {skip['index']} ({skip['path']}): {skip['reason']}", file=sys.stderr)
    per_clip = f", {summary.bytes_written / summary.computed / 1e6:.2f} MB per clip" if summary.computed else ""
    print(f"cache-features: {len(records) + len(bad)} entries in {time.perf_counter() - t0:.1f} s: "
          f"{summary.computed} computed and stored ({summary.bytes_written / 1e6:.1f} MB written{per_clip}), "
          f"{summary.stored} already in the store, {len(summary.skipped)} skipped; store: {store.dir} "
          f"({store.settings.aspect}, {store.settings.modal}, {store.settings.dtype} on {store.settings.device}, "
          f"{store.settings.media})")
    for kind, n in summary.kinds().most_common():
        print(f"  skipped {n}: {SKIP_KINDS[kind]}")
    return 0


def eval_paths(out: Path) -> tuple[Path, Path, Path]:
    """--out -> (scores JSON, per-clip results JSONL, confusion-matrix PNG)."""
    summary = out.with_suffix(".json") if out.suffix == ".jsonl" else out
    return summary, summary.with_suffix(".jsonl"), summary.with_suffix(".confusion.png")


def _label_sets(spec: str):
    if spec == "auto":
        return "auto"
    if spec == "none":
        return None
    labels = tuple(x.strip() for x in spec.split(",") if x.strip())
    if not labels:
        raise ValueError(f"--label_set {spec!r}: expected auto, none or a comma-separated list of labels")
    return {source: labels for source in ("dfew", "mafw", "ravdess")}


def cmd_eval(args: argparse.Namespace) -> int:
    """Checks, the --out lock (one eval per results file: a second is refused at once, naming the first), the
    evaluation; Ctrl-C / SIGTERM keep every finished result and say how to resume."""
    from omni_fast import distributed
    from omni_fast.api import load_settings
    from omni_fast.interrupt import exit_status
    from omni_fast.runlock import RunLock, lock_path

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: expected a number of clips >= 1")
    _check_counts(args)
    device, dtype = load_settings(args.device, _dtype(args.dtype))
    label_sets = _label_sets(args.label_set)
    paths = eval_paths(Path(args.out)) if args.out else None
    lock = None
    if paths:
        for path in paths:
            _check_writable(path, inputs=[Path(args.annotations)])
    ctx = distributed.init(args.device)  # under torchrun each rank recognises a shard; rank 0 scores
    if paths and ctx.is_main:  # rank 0 holds the lock for the whole job
        try:
            lock = RunLock(lock_path(paths[1]), "--out", paths[0]).acquire()
        except OSError as e:
            raise PermissionError(f"--out {paths[0]}: cannot write there ({e.strerror or e})") from None
    try:
        return _eval(args, paths, device, dtype, label_sets, ctx)
    except KeyboardInterrupt as e:
        kept = f"; the finished results are in {paths[1]}: run the same command again to resume" if paths else ""
        print(f"omni-fast eval: interrupted{kept}", file=sys.stderr)
        return exit_status(e)
    finally:
        if lock is not None:
            lock.release()


def _eval(args: argparse.Namespace, paths: tuple[Path, Path, Path] | None, device, dtype, label_sets, ctx) -> int:
    from omni_fast import distributed
    from omni_fast.eval import evaluate, load_done, run_header, write_confusion_png, write_json
    from omni_fast.data import load_annotations
    from omni_fast.task import EVAL_QUESTION

    records = load_annotations(args.annotations, args.data_root)[: args.limit]
    instruct = args.instruct if args.instruct is not None else EVAL_QUESTION
    header = run_header(args.model_path, args.annotations, instruct, args.max_new_tokens, args.modal, dtype=dtype,
                        device=device, media_backend=args.media_backend, bert_path=args.bert_path,
                        vision_tower=args.vision_tower, audio_tower=args.audio_tower)
    if paths and not args.overwrite:
        load_done(paths[1], header, records)  # a file from another run is refused before the model loads
    if not paths:
        print("omni-fast eval: no --out, so results are not saved and an interrupted run cannot resume",
              file=sys.stderr)
    model = _load_model(args, ctx.device)
    report = evaluate(model, records, instruct, args.max_new_tokens, args.batch_size, ctx,
                      results=paths[1] if paths else None, header=header, overwrite=args.overwrite,
                      modal=args.modal, progress=not args.no_progress, label_sets=label_sets)
    distributed.shutdown(ctx)
    if report is None:
        return 0
    _print_report(report)
    if paths:
        summary, results, png = paths
        rows = [{k: v for k, v in row.items() if k not in ("seconds", "features_from")} for row in report.rows
                if "error" not in row]
        write_json(summary, {"scores": report.as_dict(), "results": rows,
                             "seconds": round(sum(row.get("seconds", 0.0) for row in report.rows), 3)})
        shown = write_confusion_png(report.confusion, png)
        print(f"scores: {summary}; per-clip results: {results}" + (f"; confusion matrix: {shown}" if shown else ""))
    return 0


def _check_counts(args: argparse.Namespace) -> None:
    """infer / eval: the counts that must be >= 1, before anything loads."""
    for name in ("max_new_tokens", "batch_size", "media_workers", "max_num_seqs", "max_num_batched_tokens"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name} {value}: expected an integer >= 1")
    if args.encoder_cache_bytes < 0:
        raise ValueError(f"--encoder_cache_bytes {args.encoder_cache_bytes}: expected a number of bytes >= 0 (0: none)")


def _print_report(report) -> None:
    print(f"{'source':>10} {'clips':>6} {'WAR':>7} {'UAR':>7}")
    for source, s in report.by_source.items():
        print(f"{source:>10} {s['clips']:>6} {s['war']:>7.2f} {s['uar']:>7.2f}")
    print(f"{'all':>10} {report.clips:>6} {report.war:>7.2f} {report.uar:>7.2f}")
    print("recall: " + ", ".join(f"{c} {100 * r:.1f}" for c, r in report.recall.items()))
    print(f"unparsable answers (no <answer></answer>): {report.unparsable}")
    if report.tower_cache is not None:
        print(f"tower features (this run): {report.tower_cache['hits']} read from the store, "
              f"{report.tower_cache['misses']} computed and stored")
    if report.outside_label_set:
        print("left out, labels outside the label set: " +
              ", ".join(f"{label!r} x{n}" for label, n in report.outside_label_set.items()))
    for skip in report.skipped:  # a media error's message usually starts with the clip's path already
        said = skip["error"] if skip["error"].startswith(skip["path"]) else f"{skip['path']}: {skip['error']}"
        print(f"skipped {said}", file=sys.stderr)


def _check_writable(out: Path, inputs: list[Path]) -> None:
    """Before any work: --out must not be one of the inputs, nor a directory, and its folder must take a file."""
    if any(out.resolve() == p.resolve() for p in inputs):
        raise ValueError(f"--out {out} is one of the inputs; it would be replaced by the results")
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory; expected a .json file path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.probe-"):
            pass
    except OSError as e:
        raise PermissionError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def cmd_demo(args: argparse.Namespace) -> int:
    from omni_fast.api import OmniModel
    from omni_fast.testing import make_clip, make_tiny_checkpoint

    if args.serve:
        _check_ui_installed()
    if args.workdir and Path(args.workdir).exists() and any(Path(args.workdir).iterdir()):
        raise FileExistsError(f"--workdir {args.workdir} is not empty; the demo writes tiny-r1-omni/, clip.mp4 and "
                              "toy-*/ there and never overwrites files: give an empty or new directory")
    with tempfile.TemporaryDirectory(prefix="omni-fast-demo-") as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        if not args.workdir:
            print(f"[demo] working in {root} (temporary: removed at the end; --workdir DIR keeps the files)")
        stages = []

        def stage(name, fn):
            t = time.perf_counter()
            out = fn()
            stages.append((name, time.perf_counter() - t))
            print(f"[demo] {name}: {stages[-1][1]:.2f} s")
            return out

        ckpt = stage("write tiny R1-Omni checkpoint (real format)", lambda: make_tiny_checkpoint(root / "tiny-r1-omni"))
        if args.serve:
            return _demo_serve(ckpt, args.port)
        clip = stage("encode synthetic clip (h264 + aac, 3 s)", lambda: make_clip(root / "clip.mp4", seconds=3.0))
        model = stage("load checkpoint", lambda: OmniModel.from_pretrained(ckpt, bert_path=ckpt / "bert-base-uncased"))
        result = stage("recognize (decode, encoders, greedy generation)",
                       lambda: model.recognize([clip], max_new_tokens=args.max_new_tokens)[0])
        print(f"[demo] checkpoint: {ckpt}")
        print(f"[demo] media {result.timings.media:.3f} s, encode {result.timings.encode:.3f} s, "
              f"generate {result.timings.generate:.3f} s for {len(result.token_ids)} tokens")
        print(f"[demo] response (random tiny weights, so not meaningful): {result.text!r}")
        if args.grpo_steps > 0:
            stage("train on a toy task: cold-start SFT, then GRPO",
                  lambda: _demo_training(root, ckpt, args.sft_steps, args.grpo_steps))
    return 0


def _demo_serve(ckpt: Path, port: int) -> int:
    from omni_fast.config import EngineConfig
    from omni_fast.serve.config import ServeConfig

    print(f"[demo] serving {ckpt} with the page on (random tiny weights, so the answers are not meaningful); "
          "Ctrl-C stops", flush=True)
    config = ServeConfig(port=port, served_model_name="tiny-r1-omni", ui=True)
    return _serve(ckpt, ckpt / "bert-base-uncased", config, EngineConfig(max_num_seqs=config.max_num_seqs))


def _demo_training(root: Path, ckpt: Path, sft_steps: int, grpo_steps: int) -> None:
    """The toy task of omni_fast.toy (a clip's colour is its emotion): SFT teaches the answer format at chance
    accuracy, GRPO's accuracy reward teaches the task; the reward curve is printed as it goes."""
    from omni_fast.grpo.trainer import Trainer
    from omni_fast.toy import make_toy_task, toy_answers, toy_config

    task = make_toy_task(root / "toy-task")
    clips = [task.clips[label][0] for label in task.labels]
    sft = Trainer(toy_config(task, ckpt, root / "toy-sft", "sft", max_steps=max(1, sft_steps), progress=False))
    sft.train()
    print(f"[demo] SFT: {sft.pos.step} steps on the answer format, loss {sft.history[-1]['loss']:.3f}")
    before = toy_answers(sft.last_checkpoint, clips)

    def show(m: dict) -> None:
        bar = "#" * round(20 * m["rewards/accuracy_reward"])
        print(f"[demo] GRPO step {m['step']:>3}  reward {m['reward']:.2f}  accuracy {m['rewards/accuracy_reward']:.2f} "
              f"{bar:<20}  format {m['rewards/format_reward']:.2f}  kl {m['kl']:.3f}", flush=True)

    # the learning test's settings (tests/test_learning.py holds them to accuracy >= 0.8 in the last steps); a
    # smaller batch at a larger learning rate learns too, but how far in 30 steps depends on the float noise
    grpo = Trainer(toy_config(task, sft.last_checkpoint, root / "toy-grpo", "grpo", max_steps=grpo_steps,
                              progress=False), on_step=show)
    grpo.train()
    after = toy_answers(grpo.last_checkpoint, clips)
    for label, b, a in zip(task.labels, before, after):
        print(f"[demo] a {label} clip: after SFT {b!r}\n[demo] {'':>{len(label) + 7}} after GRPO {a!r}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    warnings.filterwarnings("ignore", category=FutureWarning)
    _log_to_stderr()
    from omni_fast.diskerrors import describe
    from omni_fast.grpo.trainer import TrainingError
    from omni_fast.interrupt import exit_status, sigterm_interrupts
    from omni_fast.runlock import LockedError

    sigterm_interrupts()  # SIGTERM as Ctrl-C: what is written is kept, and said (exit 143)
    try:
        if args.command == "train":
            return cmd_train(args, extra, argv)
        return {"infer": cmd_infer, "eval": cmd_eval, "serve": cmd_serve, "demo": cmd_demo,
                "cache-features": cmd_cache_features, "export": cmd_export}[args.command](args)
    except (FileNotFoundError, FileExistsError, IsADirectoryError, PermissionError, ValueError, TrainingError,
            LockedError) as e:
        print(f"omni-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only file system: one line naming the path
        print(f"omni-fast {args.command}: error: {describe(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"omni-fast {args.command}: interrupted", file=sys.stderr)
        return exit_status(e)


class _StderrLog(logging.Handler):
    """One line per record on whatever sys.stderr is at the time (a handler bound to the stream at startup
    would keep writing to a replaced one)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's own contract: a failing handler never raises
            self.handleError(record)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings (a skipped clip, a silent audio track) as one logged line, without the source line."""
    logging.getLogger("omni_fast").warning("%s", message)


def _log_to_stderr() -> None:
    """omni_fast's log lines and Python warnings (a skipped clip, a truncated instruct) as one line each on
    stderr: "omni-fast: WARNING: <message naming the clip>"."""
    logger = logging.getLogger("omni_fast")
    if not any(isinstance(h, _StderrLog) for h in logger.handlers):
        handler = _StderrLog()
        handler.setFormatter(logging.Formatter("omni-fast: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    warnings.showwarning = _warning_line


if __name__ == "__main__":
    sys.exit(main())
