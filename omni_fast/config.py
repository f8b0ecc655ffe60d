"""Configuration: slotted dataclasses that validate themselves. argparse lives only in cli.py.

ModelConfig mirrors the HumanOmni / R1-Omni `config.json` (research/r1omni.md §2.1); the keys it does not
use are kept verbatim in `extra` so a checkpoint saved by omni_fast carries the same config.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# HumanOmni placeholders spliced with encoder embeddings (humanomni/constants.py).
VIDEO_TOKEN_INDEX = -201
AUDIO_TOKEN_INDEX = -202
IGNORE_INDEX = -100

MODEL_TYPES = ("HumanOmni_qwen2",)
PROJECTOR_TYPES = ("all_in_one_small",)
AUDIO_PROJECTOR_TYPES = ("mlp2x_gelu",)


class ConfigError(ValueError):
    """A config file or argument that does not say what omni_fast expects; the message names it."""


@dataclass(slots=True)
class ModelConfig:
    hidden_size: int  # decoder width (896 for the 0.5B)
    intermediate_size: int  # SwiGLU width (4864)
    num_hidden_layers: int  # decoder layers (24)
    num_attention_heads: int  # query heads (14)
    num_key_value_heads: int  # KV heads, GQA (2)
    vocab_size: int  # embedding rows (151936)
    mm_hidden_size: int  # SigLIP width fed to the projector (768)
    audio_hidden_size: int = 1280  # Whisper encoder width fed to the audio projector
    rope_theta: float = 1_000_000.0  # RoPE base
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    max_position_embeddings: int = 32768  # longest position the rotary table covers
    tie_word_embeddings: bool = True  # lm_head shares embed_tokens.weight
    bos_token_id: int | None = 151643  # <|endoftext|>
    eos_token_id: int = 151645  # <|im_end|>, where generation stops
    model_type: str = "HumanOmni_qwen2"  # registered HumanOmni model type
    mm_projector_type: str = "all_in_one_small"  # visual projector (the 0.5B one)
    mm_audio_projector_type: str = "mlp2x_gelu"  # audio projector
    mm_vision_tower: str | None = None  # local SigLIP directory (reference: dispatched on 'siglip' in path)
    mm_audio_tower: str | None = None  # local Whisper directory ('whisper' in path)
    mm_vision_select_layer: int = -2  # hidden_states index taken from SigLIP
    mm_vision_select_feature: str = "patch"  # keep all patch tokens (SigLIP has no CLS)
    mm_use_x_start_end: bool = True  # wrap <video>/<audio> in <vi_start>..<vi_end> etc.
    num_frames: int = 8  # frames sampled per clip
    image_aspect_ratio: str = "pad"  # training-time aspect handling ("pad" = grey square)
    torch_dtype: str = "bfloat16"  # dtype the weights are stored in
    extra: dict[str, Any] = field(default_factory=dict)  # every other config.json key, kept for saving

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not supported; expected one of {MODEL_TYPES}")
        if self.mm_projector_type not in PROJECTOR_TYPES:
            raise ConfigError(f"mm_projector_type {self.mm_projector_type!r} is not supported; "
                              f"expected one of {PROJECTOR_TYPES} (the HumanOmni-0.5B / R1-Omni-0.5B projector)")
        if self.mm_audio_projector_type not in AUDIO_PROJECTOR_TYPES:
            raise ConfigError(f"mm_audio_projector_type {self.mm_audio_projector_type!r} is not supported; "
                              f"expected one of {AUDIO_PROJECTOR_TYPES}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                              f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.mm_vision_select_feature != "patch":
            raise ConfigError(f"mm_vision_select_feature {self.mm_vision_select_feature!r}: only 'patch' exists "
                              "for SigLIP towers")
        if self.num_frames < 2:
            raise ConfigError(f"num_frames must be >= 2 (the projector's temporal conv), got {self.num_frames}")
        if self.torch_dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError(f"torch_dtype {self.torch_dtype!r}: expected bfloat16, float16 or float32")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        names = {f.name for f in fields(cls)} - {"extra"}
        missing = [n for n in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "num_key_value_heads", "vocab_size", "mm_hidden_size") if n not in raw]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {missing}")
        known = {k: v for k, v in raw.items() if k in names}
        if isinstance(known.get("eos_token_id"), list):  # HF allows a list; the first is the chat EOS
            known["eos_token_id"] = known["eos_token_id"][0]
        try:
            return cls(**known, extra={k: v for k, v in raw.items() if k not in names})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file (a HumanOmni checkpoint has config.json)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        return dict(sorted(out.items()))


@dataclass(slots=True)
class SamplingParams:
    n: int = 1  # completions per prompt (the GRPO group size G)
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = off (R1-Omni rollouts: 50)
    top_p: float = 1.0  # nucleus mass; 1.0 = off
    max_tokens: int = 512  # new tokens per completion at most
    seed: int | None = None  # per-request seed; same seed -> same completions
    repetition_penalty: float = 1.0  # HF-style penalty on tokens already generated; 1.0 = off
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's EOS ids (generation_config.json)
    ignore_eos: bool = False  # keep decoding past EOS (benchmarks force fixed lengths)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ConfigError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ConfigError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"SamplingParams.repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def greedy_params(cls, max_tokens: int = 2048) -> SamplingParams:
        """The reference inference setting (mm_infer: do_sample=False)."""
        return cls(n=1, temperature=0.0, max_tokens=max_tokens)


@dataclass(slots=True)
class EngineConfig:
    max_prompts: int = 32  # prompts prefilled together; larger requests run in several batches
    max_samples: int = 256  # decode rows at once (prompts x n); the batch is split to stay under it
    sync_every: int = 16  # decode steps between host checks for finished rows (the only per-step sync)
    cuda_graphs: bool = True  # capture decode steps in CUDA graphs per batch-size bucket (CUDA only)
    graph_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # captured decode batch sizes

    def __post_init__(self) -> None:
        if self.max_prompts < 1 or self.max_samples < 1:
            raise ConfigError(f"EngineConfig: max_prompts and max_samples must be >= 1, got "
                              f"{self.max_prompts}, {self.max_samples}")
        if self.sync_every < 1:
            raise ConfigError(f"EngineConfig.sync_every must be >= 1, got {self.sync_every}")
        if list(self.graph_buckets) != sorted(set(self.graph_buckets)) or self.graph_buckets[0] < 1:
            raise ConfigError(f"EngineConfig.graph_buckets must be increasing positive sizes, got {self.graph_buckets}")


LOADER_BACKENDS = ("auto", "dali", "pyav")
ON_ERROR = ("skip", "raise")


@dataclass(slots=True)
class LoaderConfig:
    """omni_fast.media.loader.MediaLoader: what a batch holds and how clips are decoded ahead of use."""
    batch_size: int = 8  # clips per batch (a batch is smaller when clips in it were skipped)
    backend: str = "auto"  # "dali", "pyav" (thread pool) or "auto": DALI if it imports and the device is CUDA
    workers: int = 4  # PyAV decode threads (also probe/audio threads for the DALI backend)
    prefetch: int = 2  # batches decoded ahead of the one being consumed
    on_error: str = "skip"  # bad clip: "skip" (warn, name it, record it in the batch) or "raise" (MediaError)
    aspect: str = "pad"  # "pad" (training: grey square) or "stretch" (reference inference)
    num_frames: int = 8  # frames sampled per clip
    n_mels: int = 128  # Whisper mel bins
    audio: bool = True  # decode audio; False gives the 10 s-silence features without a warning (video-only)
    dali_threads: int = 4  # DALI pipeline CPU threads

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"LoaderConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.backend not in LOADER_BACKENDS:
            raise ConfigError(f"LoaderConfig.backend {self.backend!r}: expected one of {LOADER_BACKENDS}")
        if self.workers < 1 or self.dali_threads < 1:
            raise ConfigError(f"LoaderConfig.workers and dali_threads must be >= 1, got {self.workers}, "
                              f"{self.dali_threads}")
        if self.prefetch < 0:
            raise ConfigError(f"LoaderConfig.prefetch must be >= 0, got {self.prefetch}")
        if self.on_error not in ON_ERROR:
            raise ConfigError(f"LoaderConfig.on_error {self.on_error!r}: expected one of {ON_ERROR}")
        if self.aspect not in ("pad", "stretch"):
            raise ConfigError(f"LoaderConfig.aspect {self.aspect!r}: expected 'pad' or 'stretch'")
        if self.num_frames < 1 or self.n_mels < 1:
            raise ConfigError(f"LoaderConfig.num_frames and n_mels must be >= 1, got {self.num_frames}, "
                              f"{self.n_mels}")
