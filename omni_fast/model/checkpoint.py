"""Load and save HumanOmni / R1-Omni checkpoint directories (research/r1omni.md §2), never touching a hub.

A checkpoint directory holds config.json (model_type HumanOmni_qwen2 and the mm_* keys), model.safetensors
or sharded model-*.safetensors with model.safetensors.index.json, the Qwen2.5 tokenizer files and usually
generation_config.json. Where each part comes from:

  decoder, projectors, gate   the checkpoint (required)
  BERT weights                the checkpoint's `model.bert_model.*` (R1-Omni trained them; required)
  BERT config + tokenizer     `bert_path`, else <checkpoint>/bert-base-uncased, else ./bert-base-uncased
  tower weights               the checkpoint's `model.vision_tower.*` / `model.audio_tower.*` where present,
                              else the tower directories
  tower configs               the tower directories: the `vision_tower` / `audio_tower` arguments, else
                              config.json's mm_vision_tower / mm_audio_tower (relative paths are tried against
                              the working directory, as the reference does, then against the checkpoint);
                              where a directory is absent but the checkpoint holds the tower weights, the
                              configs of siglip-base-patch16-224 / whisper-large-v3 (checked against the shapes)

Every missing path, missing or unexpected tensor name and shape mismatch is a CheckpointError that names it.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import BertConfig, SiglipVisionConfig, WhisperConfig

from omni_fast.config import ConfigError, ModelConfig
from omni_fast.model.omni import HumanOmniForCausalLM, TowerConfigs
from omni_fast.model.towers import SIGLIP_BASE_PATCH16_224, WHISPER_LARGE_V3

VISION_PREFIX = "model.vision_tower.vision_tower."
AUDIO_PREFIX = "model.audio_tower.audio_tower."
BERT_FILES = ("config.json", "vocab.txt", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json", "chat_template.jinja")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class CheckpointError(ValueError):
    """A checkpoint that does not have the HumanOmni format; the message names the file, path or tensor."""


@dataclass(slots=True)
class GenerationDefaults:
    """What HF generate would take from generation_config.json when the reference calls it without them."""
    eos_token_ids: tuple[int, ...]  # generation stops at any of these
    repetition_penalty: float = 1.0  # HF applies it even when greedy
    pad_token_id: int | None = None  # filler id of finished rows


@dataclass(slots=True)
class LoadedCheckpoint:
    model: HumanOmniForCausalLM  # weights loaded, towers frozen, eval mode
    tokenizer: object  # the checkpoint's Qwen tokenizer (transformers)
    bert_tokenizer: object  # the BERT tokenizer for the gate
    config: ModelConfig  # parsed config.json
    generation: GenerationDefaults  # from generation_config.json (or config.json's eos)
    source: Path  # the checkpoint directory
    bert_dir: Path  # where the BERT config and tokenizer came from
    notes: list[str] = field(default_factory=list)  # where each part was taken from, for logs


# --- reading -----------------------------------------------------------------------------------------------------
def weight_files(root: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it, for a single-file or sharded checkpoint."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (expected a 'weight_map' object): {e}") from None
        files = {name: root / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{index} names shard {f.name}, which is missing from {root}")
        return files
    single = root / "model.safetensors"
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as f:
                return {name: single for name in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{single}: not a readable safetensors file ({e})") from None
    found = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
    raise CheckpointError(f"{root}: no model.safetensors or model.safetensors.index.json (found: {found or 'none'}); "
                          "omni_fast reads safetensors checkpoints only")


def read_tensors(files: dict[str, Path], names: list[str] | None = None) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for name in names if names is not None else files:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for path, keys in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in keys})
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: cannot read tensors ({e})") from None
    return out


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def resolve_dir(override: str | Path | None, configured: str | None, root: Path) -> Path | None:
    """A tower/BERT directory: the explicit argument (must exist), else the configured path (absolute, or
    relative to the working directory, then to the checkpoint). None when nothing exists."""
    if override is not None:
        path = Path(override).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such directory")
        return path
    if not configured:
        return None
    path = Path(configured).expanduser()
    for candidate in ([path] if path.is_absolute() else [Path.cwd() / path, root / path]):
        if candidate.is_dir():
            return candidate
    return None


def _vision_config(tower_dir: Path | None, files: dict[str, Path], cfg: ModelConfig, root: Path) -> SiglipVisionConfig:
    if tower_dir is not None:
        raw = _read_json(tower_dir / "config.json", "SigLIP config")
        raw = raw.get("vision_config", raw) if raw.get("model_type") == "siglip" else raw
        return SiglipVisionConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures")})
    if VISION_PREFIX + "vision_model.embeddings.patch_embedding.weight" not in files:
        raise CheckpointError(
            f"vision tower directory {cfg.mm_vision_tower!r} (config.json mm_vision_tower of {root}) does not exist "
            "and the checkpoint holds no vision tower weights; pass vision_tower= (CLI: --vision_tower) pointing "
            "at a local siglip-base-patch16-224 directory")
    return SiglipVisionConfig(**SIGLIP_BASE_PATCH16_224)


def _audio_config(tower_dir: Path | None, files: dict[str, Path], cfg: ModelConfig, root: Path) -> WhisperConfig:
    if tower_dir is not None:
        raw = _read_json(tower_dir / "config.json", "Whisper config")
        return WhisperConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures")})
    if AUDIO_PREFIX + "encoder.conv1.weight" not in files:
        raise CheckpointError(
            f"audio tower directory {cfg.mm_audio_tower!r} (config.json mm_audio_tower of {root}) does not exist "
            "and the checkpoint holds no audio tower weights; pass audio_tower= (CLI: --audio_tower) pointing "
            "at a local whisper-large-v3 directory")
    return WhisperConfig(**WHISPER_LARGE_V3)


def _bert_dir(bert_path: str | Path | None, root: Path) -> Path:
    if bert_path is not None:
        path = resolve_dir(bert_path, None, root)
    else:
        path = resolve_dir(None, "bert-base-uncased", root)
        if path is None:
            raise FileNotFoundError(
                f"no BERT directory: looked for {Path.cwd() / 'bert-base-uncased'} and {root / 'bert-base-uncased'}; "
                "pass bert_path= (CLI: --bert_path) pointing at a local bert-base-uncased directory (its config.json "
                "and vocab.txt are read; the weights come from the checkpoint)")
    for name in ("config.json", "vocab.txt"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing (BERT directory must hold config.json and vocab.txt)")
    return path


def _tower_tensors_from_dir(tower_dir: Path | None, prefix: str, kind: str) -> dict[str, torch.Tensor]:
    """Tower tensors from its own directory, renamed to the checkpoint's names."""
    if tower_dir is None:
        return {}
    files = weight_files(tower_dir)
    out = {}
    for name, t in read_tensors(files).items():
        if kind == "vision" and not name.startswith(("text_model.", "logit_")):
            out[prefix + (name if name.startswith("vision_model.") else f"vision_model.{name}")] = t
        elif kind == "audio" and ".encoder." in f".{name}":
            out[prefix + name[name.index("encoder."):]] = t
    return out


def _generation_defaults(root: Path, cfg: ModelConfig) -> GenerationDefaults:
    path = root / "generation_config.json"
    raw = _read_json(path, "generation config") if path.is_file() else {}
    eos = raw.get("eos_token_id", cfg.eos_token_id)
    eos = tuple(eos) if isinstance(eos, list) else (eos,)
    if cfg.eos_token_id not in eos:
        eos = (cfg.eos_token_id, *eos)
    return GenerationDefaults(eos_token_ids=eos, repetition_penalty=float(raw.get("repetition_penalty", 1.0)),
                              pad_token_id=raw.get("pad_token_id"))


def _check_names(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], root: Path) -> None:
    def listing(names: list[str]) -> str:
        return ", ".join(names[:12]) + (f" ... ({len(names)} in all)" if len(names) > 12 else "")

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = ([f"missing tensors: {listing(missing)}"] if missing else []) + (
            [f"unexpected tensors: {listing(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{root}: weights do not match the HumanOmni layout; " + "; ".join(parts))
    bad = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"{root}: tensor shapes do not match config.json: {listing(bad)}")


def _materialize_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Re-create the non-persistent buffers transformers' modules keep (position_ids, token_type_ids)."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name == "position_ids":
                value = torch.arange(buf.shape[-1], device=device).expand(buf.shape)
            elif name == "token_type_ids":
                value = torch.zeros(buf.shape, dtype=buf.dtype, device=device)
            else:
                raise CheckpointError(f"internal: buffer {name} of {type(module).__name__} has no value after loading")
            module.register_buffer(name, value.to(buf.dtype), persistent=False)


def load_tokenizer(directory: Path):
    """The tokenizer class tokenizer_config.json names (AutoTokenizer would also parse config.json, whose
    HumanOmni_qwen2 model type it does not know)."""
    import transformers

    name = _read_json(directory / "tokenizer_config.json", "tokenizer config").get("tokenizer_class") or ""
    cls = getattr(transformers, name, None) or getattr(transformers, name.removesuffix("Fast"), None)
    if cls is None:
        cls = transformers.AutoTokenizer
    try:
        return cls.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory}: cannot load the tokenizer ({e})") from None


def load_checkpoint(path: str | Path, *, bert_path: str | Path | None = None,
                    vision_tower: str | Path | None = None, audio_tower: str | Path | None = None,
                    device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LoadedCheckpoint:
    """Load a HumanOmni / R1-Omni checkpoint directory. dtype defaults to the checkpoint's torch_dtype on a GPU
    and float32 on the CPU; device defaults to CUDA where present."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such checkpoint directory")
    try:
        cfg = ModelConfig.from_json(root / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (DTYPES[cfg.torch_dtype] if device.type == "cuda" else torch.float32)
    files = weight_files(root)
    notes = []

    vision_dir = resolve_dir(vision_tower, cfg.mm_vision_tower, root)
    audio_dir = resolve_dir(audio_tower, cfg.mm_audio_tower, root)
    bert_dir = _bert_dir(bert_path, root)
    towers = TowerConfigs(vision=_vision_config(vision_dir, files, cfg, root),
                          audio=_audio_config(audio_dir, files, cfg, root),
                          bert=BertConfig(**_read_json(bert_dir / "config.json", "BERT config")))
    with torch.device("meta"):
        model = HumanOmniForCausalLM(cfg, towers)
    expected = model.state_dict()

    names = [n for n in files if not (n == "lm_head.weight" and cfg.tie_word_embeddings)]
    state = read_tensors(files, names)
    for prefix, tower_dir, kind in ((VISION_PREFIX, vision_dir, "vision"), (AUDIO_PREFIX, audio_dir, "audio")):
        if any(k.startswith(prefix) for k in state):
            notes.append(f"{kind} tower weights: {root}")
            continue
        state.update(_tower_tensors_from_dir(tower_dir, prefix, kind))
        notes.append(f"{kind} tower weights: {tower_dir}")
        if kind == "audio":  # WhisperForAudioClassification's head is never run; its weights are not in Whisper dirs
            for k in (f"{prefix}projector.weight", f"{prefix}projector.bias", f"{prefix}classifier.weight",
                      f"{prefix}classifier.bias"):
                state.setdefault(k, torch.zeros(expected[k].shape))
    _check_names(expected, state, root)
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    _materialize_buffers(model, device)
    model.model.vision_tower.requires_grad_(False)
    model.model.audio_tower.requires_grad_(False)
    model.eval()

    tokenizer = load_tokenizer(root)
    bert_tokenizer = load_tokenizer(bert_dir)
    notes.append(f"BERT config and tokenizer: {bert_dir}")
    return LoadedCheckpoint(model=model, tokenizer=tokenizer, bert_tokenizer=bert_tokenizer, config=cfg,
                            generation=_generation_defaults(root, cfg), source=root, bert_dir=bert_dir, notes=notes)


# --- writing -----------------------------------------------------------------------------------------------------
def write_safetensors(state: dict[str, torch.Tensor], directory: Path, shards: int = 1) -> None:
    """model.safetensors, or `shards` files model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    if shards <= 1:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(state)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
        total += sum(state[k].numel() * state[k].element_size() for k in part)
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def save_checkpoint(loaded: LoadedCheckpoint, directory: str | Path, *, shards: int = 1,
                    overwrite: bool = False) -> Path:
    """Write `loaded.model` as a checkpoint directory in the format it was read from: config.json, safetensors in
    the config's torch_dtype (lm_head omitted when tied), and the source's tokenizer and generation files; plus
    bert-base-uncased/ with the BERT config and tokenizer (not its weights: those are in the checkpoint), so the
    result loads without a bert_path.

    The directory is assembled beside the target and moved into place at the end, so an interrupted save never
    leaves a half-written checkpoint, and an existing one is only replaced when overwrite=True."""
    target = Path(directory).expanduser()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        dtype = DTYPES[loaded.config.torch_dtype]
        # clone: packed projections come out of state_dict() as views of one tensor, which safetensors refuses
        state = {k: v.detach().to("cpu", dtype).clone() for k, v in loaded.model.state_dict().items()}
        write_safetensors(state, tmp, shards)
        (tmp / "config.json").write_text(json.dumps(loaded.config.to_dict(), indent=2, sort_keys=True))
        for name in (*TOKENIZER_FILES, "generation_config.json"):
            if (loaded.source / name).is_file():
                shutil.copy2(loaded.source / name, tmp / name)
        (tmp / "bert-base-uncased").mkdir()  # the gate's tokenizer and config travel with the checkpoint
        for name in BERT_FILES:
            if (loaded.bert_dir / name).is_file():
                shutil.copy2(loaded.bert_dir / name, tmp / "bert-base-uncased" / name)
        move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def move_into_place(tmp: Path, target: Path) -> None:
    """Rename a fully written directory onto `target`; an existing target is moved aside first and removed
    only once the new one is in place."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
