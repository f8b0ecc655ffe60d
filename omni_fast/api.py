"""OmniModel: the drop-in inference API for HumanOmni / R1-Omni checkpoints.

    model = OmniModel.from_pretrained("R1-Omni-0.5B", bert_path="bert-base-uncased")
    for r in model.recognize(["a.mp4", "b.mp4"]):
        print(r.emotion, r.reasoning)

recognize() reproduces the reference inference.py (greedy, the checkpoint's chat template, stretched frames,
generation_config.json's EOS ids and repetition penalty as HF generate applies them) for many clips at once;
generate() samples n completions per clip with SamplingParams; forward_logits() is the full model on
preprocessed inputs, the entry other implementations are compared through.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from omni_fast.config import AUDIO_TOKEN_INDEX, VIDEO_TOKEN_INDEX, EngineConfig, LoaderConfig, SamplingParams
from omni_fast.engine.engine import Engine
from omni_fast.engine.sequence import Completion
from omni_fast.media.loader import MediaLoader
from omni_fast.model.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from omni_fast.model.prompt import ANSWER, DEFAULT_INSTRUCT, MODALS, inference_prompt, tokenize_multimodal

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def parse_response(text: str) -> tuple[str | None, str | None]:
    """-> (reasoning inside the first <think></think>, emotion inside the first <answer></answer>), None if absent."""
    think, answer = _THINK.search(text), ANSWER.search(text)
    return (think.group(1).strip() if think else None), (answer.group(1).strip() if answer else None)


@dataclass(slots=True)
class Recognition:
    video: str  # the clip
    text: str  # the decoded response, as the reference prints it
    reasoning: str | None  # inside <think></think>
    emotion: str | None  # inside <answer></answer>
    token_ids: list[int]  # generated ids (stop token included)
    finish_reason: str  # "stop" or "length"


@dataclass(slots=True)
class Generation:
    video: str  # the clip
    texts: list[str]  # the n decoded completions
    completions: list[Completion]  # ids, log-probs and finish reasons


@dataclass(slots=True)
class Timings:
    """Seconds spent per stage in the last call (media decode, encoders+projectors, generation)."""
    media: float = 0.0
    encode: float = 0.0
    generate: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"media_s": self.media, "encode_s": self.encode, "generate_s": self.generate}


# Media decoding for recognize/generate (omni_fast.media.loader) unless from_pretrained is given a LoaderConfig:
# "pyav" gives the reference decoder's frames exactly; backend "auto" uses DALI on a GPU when installed
# (faster; its YUV->RGB conversion differs by about one grey level on average, see omni_fast.media.dali).
# Batches are decoded ahead while the GPU generates. batch_size, on_error, aspect, the frame and mel counts
# are set per call.
DEFAULT_MEDIA = LoaderConfig(backend="pyav", workers=4, prefetch=1)


class OmniModel:
    def __init__(self, loaded: LoadedCheckpoint, engine_config: EngineConfig | None = None,
                 loader_config: LoaderConfig | None = None):
        self.loaded = loaded
        self.loader_config = loader_config or DEFAULT_MEDIA
        self.model, self.tokenizer, self.bert_tokenizer = loaded.model, loaded.tokenizer, loaded.bert_tokenizer
        self.config = loaded.config
        self.engine = Engine(self.model, engine_config, loaded.generation.eos_token_ids)
        self.timings = Timings()
        self.failures: list = []  # clips the last recognize/generate skipped (on_error="skip")

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, *, bert_path: str | Path | None = None,
                        vision_tower: str | Path | None = None, audio_tower: str | Path | None = None,
                        engine_config: EngineConfig | None = None,
                        loader_config: LoaderConfig | None = None) -> OmniModel:
        """Load a HumanOmni / R1-Omni checkpoint directory (see omni_fast.model.checkpoint for where each part
        is read from). dtype defaults to the checkpoint's (bf16) on a GPU and float32 on the CPU;
        engine_config tunes the rollout engine, loader_config the media decoding (backend, workers, prefetch)."""
        loaded = load_checkpoint(path, bert_path=bert_path, vision_tower=vision_tower, audio_tower=audio_tower,
                                 device=device, dtype=dtype)
        return cls(loaded, engine_config, loader_config)

    def save_pretrained(self, directory: str | Path, *, shards: int = 1, overwrite: bool = False) -> Path:
        return save_checkpoint(self.loaded, directory, shards=shards, overwrite=overwrite)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head_weight.device

    # --- inputs ------------------------------------------------------------------------------------------------
    def _bert_inputs(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.bert_tokenizer(texts, return_tensors="pt", padding=True, truncation=True, add_special_tokens=True)
        return {k: v.to(self.device) for k, v in enc.items()}

    @torch.inference_mode()
    def encode(self, frames: torch.Tensor | None, mel: torch.Tensor | None,
               instructs: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """frames (B, 8, 3, 224, 224) / mel (B, 128, 3000) / one instruct per clip -> video (B, 392, H) and
        audio (B, 500, H) embeddings (None where that input is None)."""
        video = audio = None
        if frames is not None:
            unique = sorted(set(instructs))
            weights = self.model.gate_weights(self._bert_inputs(unique))  # (U, 3)
            rows = torch.tensor([unique.index(t) for t in instructs], device=self.device)
            feats = self.model.vision_features(frames.to(self.device))
            video = self.model.project_video(feats, weights[rows])
        if mel is not None:
            audio = self.model.project_audio(self.model.audio_features(mel.to(self.device)))
        return video, audio

    def prompt_ids(self, instruct: str, modal: str = "video_audio") -> list[int]:
        """The reference inference prompt, tokenised, with -201 / -202 placeholders."""
        prompt = inference_prompt(self.tokenizer, instruct, modal, self.config.mm_use_x_start_end)
        return tokenize_multimodal(self.tokenizer, prompt)

    def _media(self, videos: list, modal: str, aspect: str, batch_size: int, on_error: str) -> MediaLoader:
        """Clips decoded `batch_size` at a time, the next batch while the current one is encoded and generated;
        a bad clip raises its MediaError (on_error="raise") or is skipped and listed in self.failures ("skip")."""
        config = dataclasses.replace(self.loader_config, batch_size=max(1, batch_size), on_error=on_error,
                                     aspect=aspect, num_frames=self.config.num_frames,
                                     n_mels=self.model.towers.audio.num_mel_bins, audio=modal != "video")
        return MediaLoader(videos, config, device=self.device)

    def _prompts(self, batch, instructs: list[str], modal: str) -> list[torch.Tensor]:
        t1 = time.perf_counter()
        frames = batch.frames if modal != "audio" else None
        mel = batch.mel if modal != "video" else None
        video, audio = self.encode(frames, mel, instructs)
        embeds = []
        with torch.inference_mode():
            for i, instruct in enumerate(instructs):
                ids = torch.tensor(self.prompt_ids(instruct, modal), device=self.device)
                embeds.append(self.model.splice(ids, None if video is None else video[i],
                                                None if audio is None else audio[i]))
        self.timings.encode += time.perf_counter() - t1
        return embeds

    @staticmethod
    def _check(videos, modal: str) -> list:
        """Paths, or records with a .video path (and optionally .audio, a separate audio file)."""
        videos = [videos] if isinstance(videos, (str, Path)) else list(videos)
        if not videos:
            raise ValueError("no videos given")
        if modal not in MODALS:
            raise ValueError(f"modal {modal!r}: expected one of {MODALS}")
        return [v if hasattr(v, "video") else str(v) for v in videos]

    # --- entry points ------------------------------------------------------------------------------------------
    def generate(self, videos, instruct: str | list[str] | None = None, sampling: SamplingParams | None = None,
                 modal: str = "video_audio", batch_size: int = 8, aspect: str = "stretch",
                 on_error: str = "raise") -> list[Generation]:
        """n sampled completions per clip. instruct: one for all clips or one per clip (default: the R1-Omni
        demo instruct); aspect: "stretch" (reference inference) or "pad" (training); on_error: "raise" on a
        clip that cannot be decoded, or "skip" it (warned, and listed in self.failures)."""
        videos = self._check(videos, modal)
        sampling = sampling or SamplingParams()
        instructs = [instruct] * len(videos) if instruct is None or isinstance(instruct, str) else list(instruct)
        instructs = [DEFAULT_INSTRUCT if i is None else i for i in instructs]
        if len(instructs) != len(videos):
            raise ValueError(f"{len(videos)} videos but {len(instructs)} instructs")
        self.timings = Timings()
        self.failures = []
        out: list[Generation] = []
        with contextlib.closing(iter(self._media(videos, modal, aspect, batch_size, on_error))) as batches:
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)  # media time: the wait for decoding not hidden behind generation
                self.timings.media += time.perf_counter() - t0
                if batch is None:
                    break
                self.failures.extend(batch.failures)
                if not len(batch):
                    continue
                embeds = self._prompts(batch, [instructs[i] for i in batch.positions], modal)
                t0 = time.perf_counter()
                results = self.engine.generate(embeds, sampling)
                self.timings.generate += time.perf_counter() - t0
                for video, completions in zip(batch.records, results):
                    texts = [self.tokenizer.decode(c.token_ids, skip_special_tokens=True).strip()
                             for c in completions]
                    out.append(Generation(video=str(getattr(video, "video", video)), texts=texts,
                                          completions=completions))
        return out

    def recognize(self, videos, instruct: str | list[str] | None = None, modal: str = "video_audio",
                  max_new_tokens: int = 2048, batch_size: int = 8, on_error: str = "raise") -> list[Recognition]:
        """Greedy recognition as the reference inference.py, batched over many clips."""
        gen = self.loaded.generation
        params = SamplingParams(n=1, temperature=0.0, max_tokens=max_new_tokens,
                                repetition_penalty=gen.repetition_penalty, stop_token_ids=gen.eos_token_ids)
        results = []
        for g in self.generate(videos, instruct, params, modal, batch_size, aspect="stretch", on_error=on_error):
            reasoning, emotion = parse_response(g.texts[0])
            c = g.completions[0]
            results.append(Recognition(video=g.video, text=g.texts[0], reasoning=reasoning, emotion=emotion,
                                       token_ids=c.token_ids, finish_reason=c.finish_reason))
        return results

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
        video, audio = self.encode(frames, mel, [instruct])
        embeds = self.model.splice(ids, None if video is None else video[0], None if audio is None else audio[0])
        return self.model(embeds[None]).float()
