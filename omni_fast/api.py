"""OmniModel: the drop-in inference API for HumanOmni / R1-Omni checkpoints.

    model = OmniModel.from_pretrained("R1-Omni-0.5B", bert_path="bert-base-uncased")
    for r in model.recognize(["a.mp4", "b.mp4"]):
        print(r.emotion, r.reasoning)
    for r in model.recognize_iter(many_clips):       # each result as soon as it (and those before it) finish
        print(r.video, r.emotion, r.timings.total)

recognize() reproduces the reference inference.py (greedy, the checkpoint's chat template, stretched frames,
float16 weights on a GPU, generation_config.json's EOS ids plus the tokenizer's EOS, its repetition penalty as
HF generate applies it) for many clips at once; generate() samples n completions per clip with SamplingParams;
forward_logits() is the full model on preprocessed inputs, the entry other implementations are compared through.

Results come back one per input clip, in input order, each with its own timings and, for a clip skipped with
on_error="skip", the error that stopped it. Clips go through one continuous-batching engine: a decoded batch's
prompts join the requests already decoding, and each prompt carries a prefix-cache key (the clip's bytes, its
decoding settings, the question), so a clip asked the same question again reuses its prompt's KV while the
engine's pool holds it (Timings.prompt_cached says so) and gives the same tokens. A clip's tower features are kept
in the encoder cache (encoder_cache_bytes of host memory, least recently used out; omni_fast/features/memory.py),
keyed by the clip's content hash and everything else they depend on (FeatureSettings: towers, frames, aspect,
modal, decoder), so a clip seen again, in any later call, skips decoding and both towers. With a tower-feature
store (tower_cache_dir, omni_fast/features/store.py) clips found there skip them too, the others are added to it.
Each result's features_from says which ("towers", "memory" or "store"); the tokens are the same either way.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from omni_fast.config import (AUDIO_TOKEN_INDEX, INFER_DTYPE, ON_ERROR, VIDEO_TOKEN_INDEX, EngineConfig, LoaderConfig,
                              SamplingParams)
from omni_fast.engine.engine import Engine
from omni_fast.engine.sequence import Completion
from omni_fast.features.key import FeatureSettings, content_hash
from omni_fast.features.memory import MemoryCache
from omni_fast.features.store import FeatureStore, StoreUnwritable
from omni_fast.features.towers import BatchFeatures, CachedTowers
from omni_fast.media.loader import MediaLoader
from omni_fast.devices import resolve_device, resolve_dtype
from omni_fast.model.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from omni_fast.model.prompt import MODALS, inference_prompt, tokenize_multimodal
from omni_fast.task import DEFAULT_INSTRUCT, parse_response

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Timings:
    """Seconds one clip spent per stage: its share (1/B) of its batch's media wait (decoding not hidden behind
    the previous batch's generation) and of its batch's encoders + projectors, and its generation (from joining
    the engine to its last token, while other clips decode beside it); and what was a cache hit."""
    media: float = 0.0
    encode: float = 0.0
    generate: float = 0.0
    prompt_cached: bool = False  # the engine read this prompt's KV from its prefix cache (no prefill)

    @property
    def total(self) -> float:
        return self.media + self.encode + self.generate

    def as_dict(self) -> dict[str, float | bool]:
        return {"media_s": self.media, "encode_s": self.encode, "generate_s": self.generate,
                "prompt_cached": self.prompt_cached}


@dataclass(slots=True)
class _Run:
    """One generate_iter call's state: its requests in the engine, the results not yet yielded."""
    instructs: list[str]
    modal: str
    aspect: str
    sampling: SamplingParams
    total: int  # clips in the call
    towers: CachedTowers  # the towers, behind the encoder cache and the tower-feature store when there are
    call: int = field(default_factory=lambda: next(_CALLS))  # request ids are unique per call
    feeding: bool = True  # decoded batches remain
    next_out: int = 0  # the next clip to yield
    live: dict = field(default_factory=dict)  # request id -> (index, video, Timings, time added, features_from)
    done: dict = field(default_factory=dict)  # index -> its Generation, not yet yielded


_CALLS = itertools.count()


@dataclass(slots=True)
class Recognition:
    video: str  # the clip
    text: str  # the decoded response, as the reference prints it ("" when the clip failed)
    reasoning: str | None  # inside <think></think>
    emotion: str | None  # inside <answer></answer>
    token_ids: list[int]  # generated ids (stop token included)
    finish_reason: str  # "stop", "length", or "error" (the clip was skipped, see error)
    index: int = 0  # position of the clip in the call's input list
    timings: Timings = field(default_factory=Timings)  # this clip's seconds per stage
    error: str | None = None  # why the clip was skipped (on_error="skip"); None when it was recognised
    features_from: str | None = None  # the clip's tower features: "towers" (computed), "memory" or "store"; None on error


@dataclass(slots=True)
class Generation:
    video: str  # the clip
    texts: list[str]  # the n decoded completions ([] when the clip failed)
    completions: list[Completion]  # ids, log-probs and finish reasons
    index: int = 0  # position of the clip in the call's input list
    timings: Timings = field(default_factory=Timings)  # this clip's seconds per stage
    error: str | None = None  # why the clip was skipped (on_error="skip"); None when it was generated
    features_from: str | None = None  # the clip's tower features: "towers" (computed), "memory" or "store"; None on error


# Media decoding for recognize/generate (omni_fast.media.loader) unless from_pretrained is given a LoaderConfig:
# "pyav" gives the reference decoder's frames exactly; backend "auto" uses DALI on a GPU when installed
# (faster; its YUV->RGB conversion differs by about one grey level on average, see omni_fast.media.dali).
# Batches are decoded ahead while the GPU generates. batch_size, on_error, aspect, the frame and mel counts
# are set per call.
DEFAULT_MEDIA = LoaderConfig(backend="pyav", workers=4, prefetch=1)
# Host memory the encoder cache may hold (0: none): R1-Omni-0.5B's features are 2.4 MB (video) + 1.3 MB (audio) per
# clip in float16, so 1 GiB keeps about 290 clips (half as many in float32, the CPU's dtype).
DEFAULT_ENCODER_CACHE_BYTES = 1 << 30


def inference_dtype(device: torch.device) -> torch.dtype:
    """float16 on a GPU, as the reference's model_init loads the whole model (towers included) for inference;
    float32 on the CPU, where half precision is slow and inexact."""
    return resolve_dtype(None, device, INFER_DTYPE)


def load_settings(device: str | torch.device | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """The device and dtype from_pretrained loads with: the given ones, else CUDA where present and
    inference_dtype there. Separate so an eval run can name them in its results header before loading."""
    device = resolve_device(device)
    return device, resolve_dtype(dtype, device, INFER_DTYPE)


def _video_name(record) -> str:
    return str(getattr(record, "video", record))


class OmniModel:
    def __init__(self, loaded: LoadedCheckpoint, engine_config: EngineConfig | None = None,
                 loader_config: LoaderConfig | None = None, tower_cache_dir: str | Path | None = None,
                 encoder_cache_bytes: int = DEFAULT_ENCODER_CACHE_BYTES):
        if isinstance(encoder_cache_bytes, bool) or not isinstance(encoder_cache_bytes, int) or encoder_cache_bytes < 0:
            raise ValueError(f"encoder_cache_bytes must be a number of bytes >= 0 (0: no encoder cache), got "
                             f"{encoder_cache_bytes!r}")
        self.loaded = loaded
        self.loader_config = loader_config or DEFAULT_MEDIA
        self.model, self.tokenizer, self.bert_tokenizer = loaded.model, loaded.tokenizer, loaded.bert_tokenizer
        self.config = loaded.config
        self.engine = Engine(self.model, engine_config, loaded.generation.eos_token_ids)
        self.tower_cache_dir = None if tower_cache_dir is None else Path(tower_cache_dir).expanduser()
        if self.tower_cache_dir is not None and self.tower_cache_dir.exists() and not self.tower_cache_dir.is_dir():
            raise NotADirectoryError(f"tower_cache_dir {self.tower_cache_dir} is not a directory")
        self._stores: dict[FeatureSettings, FeatureStore | None] = {}  # opened on first use, per settings
        # clips' tower features across calls, keyed by FeatureSettings.key(content_hash) (None: off); .stats
        self.encoder_cache = MemoryCache(encoder_cache_bytes) if encoder_cache_bytes else None

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, *, bert_path: str | Path | None = None,
                        vision_tower: str | Path | None = None, audio_tower: str | Path | None = None,
                        engine_config: EngineConfig | None = None, loader_config: LoaderConfig | None = None,
                        tower_cache_dir: str | Path | None = None,
                        encoder_cache_bytes: int = DEFAULT_ENCODER_CACHE_BYTES) -> OmniModel:
        """Load a HumanOmni / R1-Omni checkpoint directory (see omni_fast.model.checkpoint for where each part
        is read from). device: "cpu", "cuda" or "cuda:N" (default: CUDA where present). dtype defaults to float16
        on a GPU, towers included, as the reference's model_init loads it (training uses bfloat16), and float32
        on the CPU; engine_config tunes the rollout engine, loader_config the media decoding; tower_cache_dir a
        tower-feature store to read clips' features from and add them to (omni_fast/features/);
        encoder_cache_bytes the host memory that keeps clips' tower features across calls (0: none)."""
        device, dtype = load_settings(device, dtype)
        loaded = load_checkpoint(path, bert_path=bert_path, vision_tower=vision_tower, audio_tower=audio_tower,
                                 device=device, dtype=dtype)
        return cls(loaded, engine_config, loader_config, tower_cache_dir, encoder_cache_bytes)

    def save_pretrained(self, directory: str | Path, *, max_shard_size: int | str = "5GB",
                        overwrite: bool = False) -> Path:
        """The checkpoint in HumanOmni's format (sharded by bytes above max_shard_size), in config.json's
        torch_dtype; overwrite=True replaces an existing checkpoint directory, never another kind of directory.
        Weights loaded in float16 (the GPU default) have lost bfloat16's range: load with dtype=torch.bfloat16 to
        re-save a checkpoint (a warning says so; a tensor that overflowed to inf is refused)."""
        return save_checkpoint(self.loaded, directory, max_shard_size=max_shard_size, overwrite=overwrite)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head_weight.device

    # --- inputs ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, input_ids: list[torch.Tensor], frames: torch.Tensor | None, mel: torch.Tensor | None,
               instructs: list[str]) -> list[torch.Tensor]:
        """Per clip: prompt ids [T] (with -201 / -202), frames (B, 8, 3, 224, 224) / mel (B, 128, 3000) (None where
        that input is absent) and its instruct -> the spliced prompt embeddings (T', H); the gate reads each
        distinct instruct once."""
        vision = None if frames is None else self.model.vision_features(frames.to(self.device))
        audio = None if mel is None else self.model.audio_features(mel.to(self.device))
        return self.embed_features(input_ids, vision, audio, instructs)

    @torch.inference_mode()
    def embed_features(self, input_ids: list[torch.Tensor], vision: torch.Tensor | None, audio: torch.Tensor | None,
                       instructs: list[str]) -> list[torch.Tensor]:
        """encode() from the towers' features instead of the preprocessed clips (what the tower-feature store
        holds: vision (B, 8, 196, mm), audio (B, 500, audio_hidden); None where that input is absent)."""
        unique = sorted(set(instructs))
        rows = torch.tensor([unique.index(t) for t in instructs], device=self.device)
        bert = None if vision is None else self.model.bert_inputs(self.bert_tokenizer, unique)
        return self.model.prompt_embeddings(input_ids, vision, audio, bert, rows)

    def prompt_ids(self, instruct: str, modal: str = "video_audio", system: str | None = None) -> list[int]:
        """The reference inference prompt, tokenised, with -201 / -202 placeholders (system: see inference_prompt)."""
        prompt = inference_prompt(self.tokenizer, instruct, modal, self.config.mm_use_x_start_end, system)
        return tokenize_multimodal(self.tokenizer, prompt)

    def _loader_config(self, modal: str, aspect: str, batch_size: int = 1, on_error: str = "raise") -> LoaderConfig:
        return dataclasses.replace(self.loader_config, batch_size=batch_size, on_error=on_error,
                                   aspect=aspect, num_frames=self.config.num_frames,
                                   n_mels=self.model.towers.audio.num_mel_bins, audio=modal != "video")

    def _media(self, videos: list, modal: str, aspect: str, batch_size: int, on_error: str,
               lookup=None) -> MediaLoader:
        """Clips decoded `batch_size` at a time, the next batch while the current one is encoded and generated;
        a bad clip raises its MediaError (on_error="raise") or comes back in the batch's failures ("skip");
        clips `lookup` finds (in the encoder cache or the tower-feature store) are not decoded."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        return MediaLoader(videos, self._loader_config(modal, aspect, batch_size, on_error), device=self.device,
                           lookup=lookup)

    def cached_towers(self, modal: str = "video_audio", aspect: str = "stretch") -> CachedTowers:
        """The towers with the encoder cache and, when there is one, the tower-feature store for these settings in
        front of them: what generate() reads clips' features through (a caller decoding clips itself, such as the
        server, uses its lookup and features the same way; .settings.key(content_hash(clip)) is a clip's key).
        The towers' fingerprint in the key is taken once per tower module: clear encoder_cache after changing the
        towers' weights in place."""
        config = self._loader_config(modal, aspect)
        store = self._store(config, modal)
        settings = None
        if self.encoder_cache is not None and store is None:
            settings = FeatureSettings.of(self.model, config, self.device, modal)
        return CachedTowers(self.model, store, modal, self.encoder_cache, settings)

    def _store(self, config: LoaderConfig, modal: str) -> FeatureStore | None:
        """The tower-feature store for clips loaded with `config` and `modal` (None without tower_cache_dir, or
        when it cannot be written at all: then one warning, and the run goes on without it)."""
        if self.tower_cache_dir is None:
            return None
        settings = FeatureSettings.of(self.model, config, self.device, modal)
        if settings not in self._stores:
            try:
                self._stores[settings] = FeatureStore(self.tower_cache_dir, settings)
            except StoreUnwritable as e:
                log.warning("%s; going on without the tower-feature store", e)
                self._stores[settings] = None
        return self._stores[settings]

    def prompt_embeds(self, frames: torch.Tensor | None, mel: torch.Tensor | None, instructs: list[str],
                      modal: str = "video_audio", system: str | None = None) -> list[torch.Tensor]:
        """Preprocessed clips (frames (B, 8, 3, 224, 224), mel (B, 128, 3000); the one the modal does not use may
        be None) and one instruct per clip -> per clip, the inference prompt's embeddings (T_i, hidden) with the
        encoders' outputs spliced in: what the engine is given."""
        frames = frames if modal != "audio" else None
        mel = mel if modal != "video" else None
        return self.encode(self._prompt_ids_of(instructs, modal, system), frames, mel, instructs)

    def feature_embeds(self, vision: torch.Tensor | None, audio: torch.Tensor | None, instructs: list[str],
                       modal: str = "video_audio", system: str | None = None) -> list[torch.Tensor]:
        """prompt_embeds from the towers' features (vision (B, 8, 196, mm), audio (B, 500, audio_hidden): what
        the tower-feature store holds) instead of the preprocessed clips."""
        vision = vision if modal != "audio" else None
        audio = audio if modal != "video" else None
        return self.embed_features(self._prompt_ids_of(instructs, modal, system), vision, audio, instructs)

    def _prompt_ids_of(self, instructs: list[str], modal: str, system: str | None) -> list[torch.Tensor]:
        ids_of = {t: torch.tensor(self.prompt_ids(t, modal, system), device=self.device) for t in set(instructs)}
        return [ids_of[t] for t in instructs]

    def fit_positions(self, embeds: list[torch.Tensor], sampling: SamplingParams,
                      videos: list) -> list[SamplingParams]:
        """Per prompt, the sampling params with max_tokens capped to the positions the model has left (the
        rotary table ends at max_position_embeddings); a prompt that leaves none is an error with both numbers."""
        limit = self.config.max_position_embeddings
        out = []
        for e, video in zip(embeds, videos):
            n = int(e.shape[0])
            if n >= limit:
                raise ValueError(f"{_video_name(video)}: the prompt is {n} positions long (text + video + audio "
                                 f"embeddings) but the model has {limit} (max_position_embeddings in config.json); "
                                 "shorten the instruct")
            if n + sampling.max_tokens > limit:
                log.warning("%s: max_tokens %d capped to %d: the prompt takes %d of the model's %d positions",
                            _video_name(video), sampling.max_tokens, limit - n, n, limit)
                out.append(dataclasses.replace(sampling, max_tokens=limit - n))
            else:
                out.append(sampling)
        return out

    @staticmethod
    def _check(videos, modal: str, on_error: str) -> list:
        """Paths, or records with a .video path (and optionally .audio, a separate audio file)."""
        videos = [videos] if isinstance(videos, (str, Path)) else list(videos)
        if not videos:
            raise ValueError("no videos given")
        if modal not in MODALS:
            raise ValueError(f"modal {modal!r}: expected one of {MODALS}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error {on_error!r}: expected one of {ON_ERROR}")
        return [v if hasattr(v, "video") else str(v) for v in videos]

    def prefix_key(self, record, instruct: str, modal: str, aspect: str, system: str | None = None) -> str | None:
        """The engine's prefix-cache key of one clip's prompt: the SHA-256 of the clip's bytes (and of its separate
        audio file), everything its decoding depends on (modal, aspect, backend, frames, mel bins) and the text
        the prompt and the BERT gate read (instruct, system turn); None when a file cannot be read (no reuse).
        The model's weights are not in it: the cache belongs to this model's engine (reset_prefix_cache after
        changing them)."""
        try:
            content = content_hash(record, uses_audio=modal != "video")
        except OSError:
            return None
        settings = [modal, aspect, self.loader_config.backend, self.device.type, self.config.num_frames,
                    self.model.towers.audio.num_mel_bins]
        return hashlib.sha256(json.dumps([content, settings, instruct, system]).encode()).hexdigest()

    # --- entry points ------------------------------------------------------------------------------------------
    def generate_iter(self, videos, instruct: str | list[str] | None = None, sampling: SamplingParams | None = None,
                      modal: str = "video_audio", batch_size: int = 8, aspect: str = "stretch",
                      on_error: str = "raise") -> Iterator[Generation]:
        """generate(), one Generation per clip in input order, each yielded as soon as it and every clip before it
        are done. The engine is fed continuously: a decoded batch's requests join the running ones whenever the
        engine has admitted everything it was given, so clips never wait for a batch to drain."""
        videos = self._check(videos, modal, on_error)
        sampling = sampling or SamplingParams()
        instructs = [instruct] * len(videos) if instruct is None or isinstance(instruct, str) else list(instruct)
        instructs = [DEFAULT_INSTRUCT if i is None else i for i in instructs]
        if len(instructs) != len(videos):
            raise ValueError(f"{len(videos)} videos but {len(instructs)} instructs")
        if self.engine.has_unfinished_requests():
            raise RuntimeError("OmniModel.generate drives its engine itself; it holds requests added elsewhere")
        run = _Run(instructs, modal, aspect, sampling, len(videos), self.cached_towers(modal, aspect))
        with contextlib.closing(iter(self._media(videos, modal, aspect, batch_size, on_error,
                                                 run.towers.lookup))) as batches:
            try:
                while run.next_out < run.total:
                    if run.feeding and not self.engine.num_waiting_requests():
                        self._feed(run, batches)
                    if self.engine.has_unfinished_requests():
                        self._step(run)
                    elif not run.feeding and run.next_out not in run.done:
                        raise RuntimeError(f"clip {run.next_out} was neither generated nor failed")
                    while run.next_out in run.done:
                        yield run.done.pop(run.next_out)
                        run.next_out += 1
            finally:
                for request_id in list(run.live):
                    self.engine.abort_request(request_id)  # an early stop leaves the engine empty

    def _feed(self, run: _Run, batches) -> None:
        """The next decoded batch into the engine: its prompts (with their prefix-cache keys), and its failures."""
        t0 = time.perf_counter()
        batch = next(batches, None)  # media time: the wait for decoding not hidden behind generation
        media_s = time.perf_counter() - t0
        if batch is None:
            run.feeding = False
            return
        for f in batch.failures:
            run.done[f.index] = Generation(video=f.path, texts=[], completions=[], index=f.index, error=f.error)
        if not len(batch):
            return
        t0 = time.perf_counter()
        instructs = [run.instructs[i] for i in batch.positions]
        with torch.inference_mode():
            feats: BatchFeatures = run.towers.features(batch)  # cached or stored clips read, the others computed
        embeds = self.feature_embeds(feats.vision, feats.audio, instructs, run.modal)
        params = self.fit_positions(embeds, run.sampling, batch.records)
        n, now = len(batch), time.perf_counter()
        for video, index, instruct, e, sp, source in zip(batch.records, batch.positions, instructs, embeds, params,
                                                         feats.sources):
            request_id = f"clip-{run.call}-{index}"
            self.engine.add_request(request_id, e, sp, self.prefix_key(video, instruct, run.modal, run.aspect))
            run.live[request_id] = (index, _video_name(video), Timings(media=media_s / n, encode=(now - t0) / n),
                                    time.perf_counter(), source)

    def _step(self, run: _Run) -> None:
        for out in self.engine.step():
            if out.finished:
                index, video, timings, added, source = run.live.pop(out.request_id)
                timings.generate = time.perf_counter() - added
                timings.prompt_cached = out.num_cached_tokens > 0
                texts = [self.tokenizer.decode(c.token_ids, skip_special_tokens=True).strip()
                         for c in out.completions]
                run.done[index] = Generation(video=video, texts=texts, completions=out.completions, index=index,
                                             timings=timings, features_from=source)

    def generate(self, videos, instruct: str | list[str] | None = None, sampling: SamplingParams | None = None,
                 modal: str = "video_audio", batch_size: int = 8, aspect: str = "stretch",
                 on_error: str = "raise") -> list[Generation]:
        """n sampled completions per clip. instruct: one for all clips or one per clip (default: the R1-Omni
        demo instruct); aspect: "stretch" (reference inference) or "pad" (training); on_error: "raise" on a
        clip that cannot be decoded, or "skip" it (logged; its Generation carries the error and no texts)."""
        return list(self.generate_iter(videos, instruct, sampling, modal, batch_size, aspect, on_error))

    def recognize_iter(self, videos, instruct: str | list[str] | None = None, modal: str = "video_audio",
                       max_new_tokens: int = 2048, batch_size: int = 8,
                       on_error: str = "raise") -> Iterator[Recognition]:
        """recognize(), one Recognition per clip in input order, each yielded as soon as it and the clips before it
        are done (a caller that stops early, or a KeyboardInterrupt, keeps every result already yielded)."""
        gen = self.loaded.generation
        params = SamplingParams(n=1, temperature=0.0, max_tokens=max_new_tokens,
                                repetition_penalty=gen.repetition_penalty, stop_token_ids=gen.eos_token_ids)
        for g in self.generate_iter(videos, instruct, params, modal, batch_size, aspect="stretch", on_error=on_error):
            if g.error is not None:
                yield Recognition(video=g.video, text="", reasoning=None, emotion=None, token_ids=[],
                                  finish_reason="error", index=g.index, timings=g.timings, error=g.error)
                continue
            reasoning, emotion = parse_response(g.texts[0])
            c = g.completions[0]
            yield Recognition(video=g.video, text=g.texts[0], reasoning=reasoning, emotion=emotion,
                              token_ids=c.token_ids, finish_reason=c.finish_reason, index=g.index,
                              timings=g.timings, features_from=g.features_from)

    def recognize(self, videos, instruct: str | list[str] | None = None, modal: str = "video_audio",
                  max_new_tokens: int = 2048, batch_size: int = 8, on_error: str = "raise") -> list[Recognition]:
        """Greedy recognition as the reference inference.py, batched over many clips: one Recognition per clip,
        in input order (with on_error="skip", a clip that cannot be decoded has finish_reason "error")."""
        return list(self.recognize_iter(videos, instruct, modal, max_new_tokens, batch_size, on_error))

    @torch.inference_mode()
    def forward_logits(self, input_ids: torch.Tensor, frames: torch.Tensor | None = None,
                       mel: torch.Tensor | None = None, instruct: str = "") -> torch.Tensor:
        """input_ids [1, T] with -201 / -202 placeholders, frames [8, 3, 224, 224] normalised, mel [128, 3000],
        the instruct text for the BERT gate -> LLM logits [1, T', V] float32 over the spliced sequence."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, T], got {tuple(input_ids.shape)}")
        ids = input_ids[0].to(self.device)
        if frames is not None and frames.dim() == 4:
            frames = frames[None]
        if mel is not None and mel.dim() == 2:
            mel = mel[None]
        if frames is None and bool((ids == VIDEO_TOKEN_INDEX).any()):
            raise ValueError("input_ids hold a video placeholder (-201) but frames is None")
        if mel is None and bool((ids == AUDIO_TOKEN_INDEX).any()):
            raise ValueError("input_ids hold an audio placeholder (-202) but mel is None")
        (embeds,) = self.encode([ids], frames, mel, [instruct])
        return self.model(embeds[None]).float()
