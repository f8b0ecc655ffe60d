"""Configuration: slotted dataclasses that validate themselves. argparse lives only in cli.py.

ModelConfig mirrors the HumanOmni / R1-Omni `config.json` (docs/REFERENCE.md §1); the keys it does not
use are kept verbatim in `extra` so a checkpoint saved by omni_fast carries the same config.json.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omni_fast.task import EMOTION_LABELS

# HumanOmni placeholders spliced with encoder embeddings (humanomni/constants.py).
VIDEO_TOKEN_INDEX = -201
AUDIO_TOKEN_INDEX = -202
# Frames sampled per clip and Whisper mel bins of the 0.5B checkpoints (docs/REFERENCE.md §1, §3): the one
# source of ModelConfig's and LoaderConfig's defaults and of omni_fast.media's.
NUM_FRAMES = 8
N_MELS = 128
# Inference dtype on CUDA: the reference's model_init loads everything, towers included, in float16 (training
# stays bfloat16, GRPOConfig.dtype); on the CPU inference runs in float32.
INFER_DTYPE = "float16"

MODEL_TYPES = ("HumanOmni_qwen2",)
PROJECTOR_TYPES = ("all_in_one_small",)
AUDIO_PROJECTOR_TYPES = ("mlp2x_gelu",)


PARALLELISM = ("ddp", "fsdp")  # GRPOConfig.parallelism


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
    num_frames: int = NUM_FRAMES  # frames sampled per clip
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
        for name in ("n", "top_k", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"SamplingParams.{name} must be an integer, got {value!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ConfigError(f"SamplingParams.seed must be an integer or None, got {self.seed!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):  # NaN fails every comparison below
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"SamplingParams.{name} must be a finite number, got {value!r}")
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
        if self.stop_token_ids is not None:
            self.stop_token_ids = tuple(self.stop_token_ids)
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
                raise ConfigError(f"SamplingParams.stop_token_ids must be token ids >= 0, got {self.stop_token_ids}")

    @classmethod
    def greedy_params(cls, max_tokens: int = 2048) -> SamplingParams:
        """The reference inference setting (mm_infer: do_sample=False)."""
        return cls(n=1, temperature=0.0, max_tokens=max_tokens)


ADMISSION = ("continuous", "static")  # EngineConfig.admission


@dataclass(slots=True)
class EngineConfig:
    """The continuous-batching engine (omni_fast/engine/): how many rows run, how much prefill a step takes, and
    the bounded KV pool (vLLM's names where the concept is the same)."""
    max_num_seqs: int = 256  # sample rows decoding at once (requests x n); admission waits beyond it
    max_num_batched_tokens: int = 2048  # prefill tokens per step; a longer prompt is prefilled in chunks
    block_size: int = 16  # tokens per KV-pool block (a power of two)
    kv_cache_memory: int | None = None  # bytes of the KV pool; None: gpu_memory_utilization on a GPU, 2 GiB on the CPU
    gpu_memory_utilization: float = 0.9  # GPU: the fraction of the card the weights, activations and pool may fill
    admission: str = "continuous"  # "continuous" (join at every step) or "static" (nothing joins until all drain)
    cuda_graphs: bool = True  # capture decode steps in CUDA graphs per batch-size bucket (CUDA only)
    graph_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # captured decode batch sizes

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ConfigError(f"EngineConfig: max_num_seqs and max_num_batched_tokens must be >= 1, got "
                              f"{self.max_num_seqs}, {self.max_num_batched_tokens}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"EngineConfig.block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ConfigError(f"EngineConfig.kv_cache_memory must be a positive number of bytes or None, got "
                              f"{self.kv_cache_memory}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"EngineConfig.gpu_memory_utilization must be in (0, 1], got "
                              f"{self.gpu_memory_utilization}")
        if self.admission not in ADMISSION:
            raise ConfigError(f"EngineConfig.admission {self.admission!r}: expected one of {ADMISSION}")
        self.graph_buckets = tuple(self.graph_buckets)
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
    on_error: str = "skip"  # bad clip: "skip" (log it by name, record it in the batch) or "raise" (MediaError)
    aspect: str = "pad"  # "pad" (training: grey square) or "stretch" (reference inference)
    num_frames: int = NUM_FRAMES  # frames sampled per clip (the checkpoint's config.num_frames)
    n_mels: int = N_MELS  # Whisper mel bins (the audio tower's num_mel_bins)
    audio: bool = True  # decode audio; False gives the 10 s-silence features without a log line (video-only)
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


# --- training -------------------------------------------------------------------------------------------------
STAGES = ("sft", "grpo")
SCHEDULERS = ("linear", "cosine", "constant")
TRAIN_DTYPES = ("auto", "float32", "bfloat16")
PROMPT_TEMPLATES = ("qwen2vl", "chat_template")  # omni_fast.grpo.inputs.grpo_prompt_ids
# the decoder's linears, as Hugging Face's Qwen2 names them (omni_fast.model.lora checks lora_target_modules)
LORA_DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OVERLONG_REWARD = "overlong"  # the registered name of DAPO's soft overlong punishment (omni_fast.grpo.rewards)
# Per-stage recipe defaults for the fields left as None: R1-Omni's GRPO run (run_grpo_humanomni.sh + trl 0.14.0
# GRPOConfig) and its EMER cold-start SFT (finetune_omni_emer.sh), docs/REFERENCE.md §7.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "grpo": dict(learning_rate=1e-6, lr_scheduler_type="linear", warmup_ratio=0.0, num_train_epochs=2,
                 per_device_train_batch_size=1, gradient_accumulation_steps=2),
    "sft": dict(learning_rate=2e-5, lr_scheduler_type="cosine", warmup_ratio=0.03, num_train_epochs=5,
                per_device_train_batch_size=2, gradient_accumulation_steps=1),
}


def _field(default: Any, help: str) -> Any:
    """A GRPOConfig field with its one-line help, which `omni-fast train --help` prints (GRPOConfig.describe)."""
    return field(default=default, metadata={"help": help})


@dataclass(slots=True)
class GRPOConfig:
    """`omni-fast train`'s configuration: TRL's GRPOConfig names where the concept is the same, R1-Omni's
    recipe as the defaults (fields left None take the stage's value from STAGE_DEFAULTS)."""
    # --- what to train on ---
    model_path: str | None = _field(None, "HumanOmni / R1-Omni checkpoint directory to start from")
    train_annotations: str | None = _field(None, "R1-Omni / HumanOmni annotation file (.json list or .jsonl)")
    video_root: str | None = _field(None, "relative clip paths are resolved against it (default: the file's folder)")
    bert_path: str | None = _field(None, "BERT config + tokenizer directory (default: <model_path>/bert-base-uncased)")
    output_dir: str = _field("omni-fast-output", "checkpoint-<step>/, metrics.jsonl, train.log")
    stage: str = _field("grpo", "sft (cold start: cross-entropy on the assistant turn) or grpo")
    label_set: tuple[str, ...] = _field(EMOTION_LABELS, "labels a record may carry; others are bad entries")
    on_bad_clip: str = _field("skip", "missing / undecodable clip or unknown label: skip (logged, counted) or raise")
    # --- GRPO ---
    num_generations: int = _field(8, "completions per prompt (the group size G)")
    beta: float = _field(0.04, "weight of the k3 KL to the reference model (0: no reference model is kept)")
    loss_type: str = _field("grpo", "grpo (R1-Omni: per-sequence mean), bnpo, dr_grpo or dapo (grpo/loss.py)")
    num_iterations: int = _field(1, "optimizer steps per rollout batch (>1: PPO-clipped ratio against the "
                                    "rollout policy)")
    epsilon: float = _field(0.2, "lower clip of the ratio (num_iterations > 1)")
    epsilon_high: float | None = _field(None, "upper clip (DAPO's clip-higher); None: epsilon")
    scale_rewards: str = _field("group", "advantage scale: group std (R1-Omni), batch std, or none (Dr. GRPO)")
    reward_funcs: tuple[str, ...] = _field(("accuracy", "format"), "registered names, or module:function to import")
    reward_weights: tuple[float, ...] | None = _field(None, "one weight per reward function; None: all 1.0")
    prompt_template: str = _field("qwen2vl", "GRPO prompt: qwen2vl (the reference trainer's) or chat_template "
                                             "(as SFT renders it)")
    temperature: float = _field(1.0, "rollout sampling temperature (the reference hard-codes 1.0)")
    top_k: int = _field(50, "rollout top-k (HF generate's default, which the reference inherits)")
    top_p: float = _field(1.0, "rollout nucleus mass")
    max_prompt_length: int = _field(512, "prompt token ids kept (left-truncated; a placeholder counts as one)")
    max_completion_length: int = _field(512, "new tokens per rollout")
    max_length: int = _field(2048, "SFT: prompt + target token ids kept (the reference's model_max_length)")
    # --- DAPO's overlong shaping (off by default: R1-Omni's recipe) ---
    mask_truncated_completions: bool = _field(False, "completions cut at max_completion_length (no stop token) are "
                                                     "left out of the loss (TRL; DAPO's overlong filtering)")
    overlong_buffer_len: int = _field(0, "> 0: the reward overlong (DAPO's soft overlong punishment) falls linearly "
                                         "over the last this many tokens before max_completion_length")
    overlong_penalty_factor: float = _field(1.0, "the reward overlong at max_completion_length tokens is minus this "
                                                 "(verl's name)")
    # --- DAPO's dynamic sampling (off by default) ---
    dynamic_sampling: bool = _field(False, "groups whose rewards are all equal leave the step, and more prompts are "
                                           "rolled out until it is full (DAPO)")
    max_num_gen_batches: int = _field(10, "dynamic sampling: batches of a step's prompts a step draws at most, its own "
                                          "included (verl's name)")
    # --- LoRA (TRL's names; off by default) ---
    use_peft: bool = _field(False, "train LoRA adapters (peft) only; the reference is the policy with its adapters "
                                   "off")
    lora_r: int = _field(16, "adapter rank")
    lora_alpha: int = _field(32, "adapter scale numerator: the update is lora_alpha / lora_r x B A")
    lora_dropout: float = _field(0.0, "dropout on the adapters' input, in the policy's gradient pass only")
    lora_target_modules: tuple[str, ...] = _field(LORA_DECODER_TARGETS, "linears with adapters, Hugging Face's names "
                                                                        "(q_proj ... down_proj); add mm_projector / "
                                                                        "audio_projector for the projectors'")
    # --- optimisation (None: the stage's default) ---
    learning_rate: float | None = _field(None, "AdamW peak learning rate (GRPO 1e-6, SFT 2e-5)")
    lr_scheduler_type: str | None = _field(None, "linear (GRPO), cosine (SFT) or constant, after warmup")
    warmup_ratio: float | None = _field(None, "fraction of the steps with a linear warmup (GRPO 0, SFT 0.03)")
    weight_decay: float = _field(0.0, "AdamW decoupled weight decay")
    adam_beta1: float = _field(0.9, "AdamW beta1")
    adam_beta2: float = _field(0.999, "AdamW beta2")
    adam_epsilon: float = _field(1e-8, "AdamW epsilon")
    max_grad_norm: float = _field(1.0, "global gradient-norm clip; 0 disables it")
    per_device_train_batch_size: int | None = _field(None, "prompts per micro-step (GRPO 1, SFT 2); any value works")
    gradient_accumulation_steps: int | None = _field(None, "micro-steps per optimizer step (GRPO 2, SFT 1)")
    generation_batch_size: int | None = _field(None, "GRPO: prompts rolled out together in one engine call (TRL's "
                                                     "name), a multiple of per_device_train_batch_size dividing a "
                                                     "step's prompts; None: the whole step's")
    num_train_epochs: int | None = _field(None, "passes over the data (GRPO 2, SFT 5)")
    max_steps: int = _field(-1, "optimizer steps; > 0 overrides num_train_epochs")
    # --- bookkeeping ---
    save_steps: int = _field(1000, "a checkpoint every this many optimizer steps (and one at the end)")
    save_total_limit: int | None = _field(None, "keep at most this many checkpoints (oldest removed first)")
    logging_steps: int = _field(1, "a metrics.jsonl line every this many steps")
    seed: int = _field(42, "data order, rollout seeds (keyed by seed, step and prompt index) and initial RNG state")
    # --- where and how it runs ---
    device: str | None = _field(None, "cuda or cpu (default: cuda when present)")
    dtype: str = _field("auto", "parameter dtype: auto = bfloat16 on CUDA (fp32 master weights) / float32 on CPU")
    parallelism: str = _field("ddp", "over torchrun ranks: ddp (whole model on every rank) or fsdp (FSDP2: the "
                                     "trained weights, gradients and optimizer state sharded; a full bf16 copy kept "
                                     "for the rollout engine)")
    media_backend: str = _field("auto", "clip decoding: auto (DALI on a GPU when installed), dali or pyav")
    media_workers: int = _field(4, "decode threads (PyAV)")
    tower_cache_dir: str | None = _field(None, "tower-feature store (omni-fast cache-features): clips found there skip "
                                               "decoding and both towers, the run adds the others")
    progress: bool = _field(True, "a progress bar on stderr (tqdm)")

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"stage {self.stage!r}: expected one of {STAGES}")
        for name, value in STAGE_DEFAULTS[self.stage].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.label_set = tuple(self.label_set)
        self.lora_target_modules = tuple(self.lora_target_modules)
        self.reward_funcs = tuple(self.reward_funcs)
        if self.reward_weights is not None:
            self.reward_weights = tuple(float(w) for w in self.reward_weights)
        self._check_choices()
        self._check_numbers()

    def _check_choices(self) -> None:
        # loss_type, scale_rewards and reward_funcs are checked where their choices live (the trainer's
        # check_config), so that this module imports nothing of grpo/
        choices = {"on_bad_clip": ON_ERROR, "lr_scheduler_type": SCHEDULERS, "dtype": TRAIN_DTYPES,
                   "media_backend": LOADER_BACKENDS, "prompt_template": PROMPT_TEMPLATES, "parallelism": PARALLELISM}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} {getattr(self, name)!r}: expected one of {allowed}")
        if not self.reward_funcs:  # the names themselves are resolved where they are used (the trainer)
            raise ConfigError("reward_funcs must name at least one reward function")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"reward_weights has {len(self.reward_weights)} values for "
                              f"{len(self.reward_funcs)} reward_funcs")
        if not self.label_set:
            raise ConfigError("label_set must name at least one label")
        if self.dynamic_sampling and self.stage != "grpo":
            raise ConfigError("dynamic_sampling is a GRPO option (it drops groups of completions); stage is "
                              f"{self.stage!r}")
        if OVERLONG_REWARD in self.reward_funcs and self.overlong_buffer_len == 0:
            raise ConfigError(f"reward_funcs names {OVERLONG_REWARD!r} but overlong_buffer_len is 0: set "
                              "overlong_buffer_len (the tokens before max_completion_length it penalises)")

    def _check_numbers(self) -> None:
        for f in fields(self):  # inf passes every range check below (and NaN fails them with a muddled message)
            values = getattr(self, f.name)
            for v in values if isinstance(values, tuple) else (values,):
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"{f.name} must be a finite number, got {values!r}")
        at_least = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "num_train_epochs": 1,
                    "max_prompt_length": 1, "max_completion_length": 1, "max_length": 2, "save_steps": 1,
                    "logging_steps": 1, "num_iterations": 1, "media_workers": 1, "max_num_gen_batches": 1,
                    "num_generations": 2 if self.stage == "grpo" else 1}
        for name, low in at_least.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        gen = self.generation_batch_size
        if gen is not None and (not isinstance(gen, int) or isinstance(gen, bool) or gen < 1
                                or gen % self.per_device_train_batch_size or self.prompts_per_step % gen):
            raise ConfigError(f"generation_batch_size must be None or a multiple of per_device_train_batch_size "
                              f"({self.per_device_train_batch_size}) that divides a step's "
                              f"{self.prompts_per_step} prompts, got {gen!r}")
        if not isinstance(self.max_steps, int) or (self.max_steps < 1 and self.max_steps != -1):
            raise ConfigError(f"max_steps must be -1 (use num_train_epochs) or >= 1, got {self.max_steps!r}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(f"save_total_limit must be None or >= 1, got {self.save_total_limit}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("beta", "weight_decay", "max_grad_norm", "adam_epsilon"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.epsilon < 1 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ConfigError(f"epsilon must be in (0, 1) and epsilon_high > 0, got {self.epsilon}, {self.epsilon_high}")
        buffer = self.overlong_buffer_len
        if not isinstance(buffer, int) or isinstance(buffer, bool) or not 0 <= buffer <= self.max_completion_length:
            raise ConfigError(f"overlong_buffer_len must be an integer in [0, max_completion_length "
                              f"{self.max_completion_length}], got {buffer!r}")
        for name in ("lora_r", "lora_alpha"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.overlong_penalty_factor < 0:
            raise ConfigError(f"overlong_penalty_factor must be >= 0, got {self.overlong_penalty_factor}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 for rollouts (sampling), got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k}, {self.top_p}")

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        """(field, default, its help) for every field, in order (for `omni-fast train --help`)."""
        return [(f.name, f.default, f.metadata.get("help", "")) for f in fields(cls)]

    @property
    def rewards(self) -> tuple[tuple[str, float], ...]:
        """(reward name, weight) of every reward a step scores: reward_funcs with reward_weights (None: 1.0), and
        "overlong" at weight 1 when overlong_buffer_len > 0 and reward_funcs does not name it already."""
        weights = self.reward_weights or (1.0,) * len(self.reward_funcs)
        extra = ((OVERLONG_REWARD, 1.0),) if self.overlong_buffer_len and OVERLONG_REWARD not in self.reward_funcs \
            else ()
        return tuple(zip(self.reward_funcs, weights)) + extra

    @property
    def prompts_per_step(self) -> int:
        """Prompts in one optimizer step (per process)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def generation_prompts(self) -> int:
        """Prompts rolled out in one engine call: generation_batch_size, or the whole step's."""
        return self.generation_batch_size or self.prompts_per_step

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config",
                  command_line: frozenset[str] = frozenset()) -> GRPOConfig:
        """Fields from a mapping; an error names `source` (the config file), or "command line" and the --key for
        the keys in `command_line` (given as --key value overrides)."""
        names = {f.name: f for f in fields(cls)}
        unknown = [k for k in raw if k not in names]
        if unknown:
            import difflib

            hints = {k: difflib.get_close_matches(k, names, 1) for k in unknown}
            said = ", ".join(_key(k, k in command_line) + (f" (did you mean {_key(h[0], k in command_line)}?)"
                                                            if h else "") for k, h in hints.items())
            where = "command line" if set(unknown) <= command_line else source
            raise ConfigError(f"{where}: unknown {'option' if where == 'command line' else 'key'}(s) {said}")
        values = {k: _coerce(k, v, names[k].type, "command line" if k in command_line else source,
                             k in command_line) for k, v in raw.items()}
        try:
            return cls(**values)
        except ConfigError as e:
            said = str(e)
            if said.startswith(source):
                raise
            first = said.split(" ", 1)[0]
            if first in command_line:
                raise ConfigError(f"command line: --{said}") from None
            raise ConfigError(f"{source}: {said}") from None

    @classmethod
    def from_file(cls, path: str | Path | None, overrides: dict[str, str | None] | None = None) -> GRPOConfig:
        """A YAML or JSON file (or none), then `--key value` overrides (strings, parsed as YAML scalars/lists; None
        for a bare --key, which only a bool field takes, as true)."""
        raw: dict[str, Any] = {}
        if path is not None:
            raw = _read_config_file(Path(path))
        bools = {f.name for f in fields(cls) if str(f.type) == "bool"}
        for key, text in (overrides or {}).items():
            import yaml

            if text is None:
                if key in bools:
                    raw[key] = True
                    continue
                if key in {f.name for f in fields(cls)}:
                    raise ConfigError(f"command line: --{key} needs a value (--{key} VALUE or --{key}=VALUE)")
                text = "true"  # an unknown key: from_dict names it
            try:
                raw[key] = yaml.safe_load(text) if text != "" else ""
            except yaml.YAMLError:
                raw[key] = text
        return cls.from_dict(raw, source=str(path) if path is not None else "arguments",
                             command_line=frozenset(overrides or ()))

    # --- resuming -------------------------------------------------------------------------------------------------
    def resume_changes(self, saved: dict[str, Any], checkpoint: str = "the checkpoint") -> list[tuple[str, Any, Any]]:
        """(field, checkpoint's value, this value) for each field that differs from `saved` (the config a checkpoint
        was written with) and may change on resume (RESUME_RULES); a ConfigError naming every field that may not,
        with both values and why. Fields the checkpoint does not record are not compared."""
        mine = self.to_dict()
        changed, refused = [], []
        for name, value in mine.items():
            if name not in saved or _same_value(name, saved[name], value):
                continue
            rule, why = RESUME_RULES[name]
            if rule == RESUME_FIXED:
                refused.append(f"{name} {saved[name]!r} -> {value!r} ({why})")
            else:
                changed.append((name, saved[name], value))
        if refused:
            raise ConfigError(f"{checkpoint} was trained with other values that cannot change on resume: "
                              f"{'; '.join(refused)}; give the checkpoint's values, or start a new run in another "
                              "output_dir")
        return changed


# What --resume_from_checkpoint does with a field whose value differs from the one the checkpoint was written with
# (GRPOConfig.resume_changes; tests check that every field has a rule):
#   free      used from the resumed step on: nothing the checkpoint holds depends on it;
#   schedule  the learning-rate schedule is rebuilt from it: every later step k runs at learning_rate x factor(k) of
#             the new schedule, the rate a run started with the new values has at step k (AdamW's moments kept);
#   batch     may change only as another split of the same global batch (per_device_train_batch_size x
#             gradient_accumulation_steps x processes, as when resuming under another number of processes): the
#             saved data position and step count assume that many prompts a step (grpo/resume.py checks it);
#   fixed     the checkpoint's state depends on it (data order and position, optimizer state, the weights it
#             started from): refused with the field, both values and the reason.
RESUME_FREE, RESUME_SCHEDULE, RESUME_BATCH, RESUME_FIXED = "free", "schedule", "batch", "fixed"
_BATCH = "the global batch: the saved data position and step count assume its prompts a step"
_DATA = "the saved data position indexes the entries it selects"
_ADAM = "kept in optimizer.pt with AdamW's moments"
RESUME_RULES: dict[str, tuple[str, str]] = {
    "model_path": (RESUME_FIXED, "the run's initial weights: its reference model"),
    "train_annotations": (RESUME_FIXED, _DATA),
    "video_root": (RESUME_FIXED, _DATA),
    "bert_path": (RESUME_FIXED, "the reference model's BERT config and tokenizer"),
    "output_dir": (RESUME_FREE, ""),
    "stage": (RESUME_FIXED, "the objective, and which weights are trained"),
    "label_set": (RESUME_FIXED, _DATA),
    "on_bad_clip": (RESUME_FREE, ""),
    "num_generations": (RESUME_FIXED, "the group size of the rollouts and their seeds"),
    "beta": (RESUME_FREE, ""),
    "loss_type": (RESUME_FREE, ""),
    "num_iterations": (RESUME_FIXED, "optimizer steps per rollout batch: the saved step count depends on it"),
    "epsilon": (RESUME_FREE, ""),
    "epsilon_high": (RESUME_FREE, ""),
    "scale_rewards": (RESUME_FREE, ""),
    "reward_funcs": (RESUME_FREE, ""),
    "reward_weights": (RESUME_FREE, ""),
    "prompt_template": (RESUME_FREE, ""),
    "temperature": (RESUME_FREE, ""),
    "top_k": (RESUME_FREE, ""),
    "top_p": (RESUME_FREE, ""),
    "max_prompt_length": (RESUME_FREE, ""),
    "max_completion_length": (RESUME_FREE, ""),
    "max_length": (RESUME_FREE, ""),
    "mask_truncated_completions": (RESUME_FREE, ""),
    "overlong_buffer_len": (RESUME_FREE, ""),
    "overlong_penalty_factor": (RESUME_FREE, ""),
    "dynamic_sampling": (RESUME_FREE, ""),
    "max_num_gen_batches": (RESUME_FREE, ""),
    "use_peft": (RESUME_FIXED, "which weights the checkpoint holds (an adapter, or the whole model)"),
    "lora_r": (RESUME_FIXED, "the adapter's shape"),
    "lora_alpha": (RESUME_FIXED, "the adapter's scale: the saved A and B mean another update under another"),
    "lora_dropout": (RESUME_FREE, ""),
    "lora_target_modules": (RESUME_FIXED, "which linears the saved adapter has"),
    "learning_rate": (RESUME_SCHEDULE, ""),
    "lr_scheduler_type": (RESUME_SCHEDULE, ""),
    "warmup_ratio": (RESUME_SCHEDULE, ""),
    "weight_decay": (RESUME_FIXED, _ADAM),
    "adam_beta1": (RESUME_FIXED, _ADAM),
    "adam_beta2": (RESUME_FIXED, _ADAM),
    "adam_epsilon": (RESUME_FIXED, _ADAM),
    "max_grad_norm": (RESUME_FREE, ""),
    "per_device_train_batch_size": (RESUME_BATCH, _BATCH),
    "gradient_accumulation_steps": (RESUME_BATCH, _BATCH),
    "generation_batch_size": (RESUME_FREE, ""),
    "num_train_epochs": (RESUME_SCHEDULE, ""),
    "max_steps": (RESUME_SCHEDULE, ""),
    "save_steps": (RESUME_FREE, ""),
    "save_total_limit": (RESUME_FREE, ""),
    "logging_steps": (RESUME_FREE, ""),
    "seed": (RESUME_FIXED, "the data order and the rollout seeds"),
    "device": (RESUME_FREE, ""),
    "dtype": (RESUME_FIXED, "the parameters' precision, and whether fp32 master weights were saved"),
    "parallelism": (RESUME_FREE, ""),
    "media_backend": (RESUME_FREE, ""),
    "media_workers": (RESUME_FREE, ""),
    "tower_cache_dir": (RESUME_FREE, ""),  # the store gives the towers' own bits: nothing depends on it
    "progress": (RESUME_FREE, ""),
}
_PATH_FIELDS = ("model_path", "train_annotations", "video_root", "bert_path")


def _same_value(name: str, old: Any, new: Any) -> bool:
    if name in _PATH_FIELDS and isinstance(old, str) and isinstance(new, str):
        return os.path.realpath(os.path.expanduser(old)) == os.path.realpath(os.path.expanduser(new))
    return old == new


def _key(name: str, command_line: bool) -> str:
    return f"--{name}" if command_line else repr(name)


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - json / yaml parse errors have no common base
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({e})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of GRPOConfig fields, got {type(raw).__name__}")
    return raw


def _coerce(name: str, value: Any, annotation: str, source: str, command_line: bool = False) -> Any:
    """A YAML/JSON value -> the field's type (int, float, str, bool, tuple), or ConfigError naming the key (as
    `--name` for a command-line value)."""
    kinds = [a.strip() for a in str(annotation).split("|")]
    if value is None and "None" in kinds:
        return None
    base = kinds[0]
    try:
        if base.startswith("tuple"):
            if isinstance(value, str):
                items = [v.strip() for v in value.split(",")]
            else:
                items = list(value) if isinstance(value, (list, tuple)) else [value]
            return tuple(float(v) for v in items) if "float" in base else tuple(str(v) for v in items)
        if base == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "false", "1", "0", "yes", "no"):
                return str(value).lower() in ("true", "1", "yes")
            raise ValueError
        if base == "int":
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value) if value is not None else value
    except (TypeError, ValueError, OverflowError):
        where = f"--{name} {value!r}" if command_line else f"{name} = {value!r}"
        raise ConfigError(f"{source}: {where} is not a valid {annotation}") from None
