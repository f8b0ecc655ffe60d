"""Load and save HumanOmni / R1-Omni checkpoint directories (docs/REFERENCE.md §1), never touching a hub.

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

Every missing path, unreadable file, missing or unexpected tensor name and shape mismatch is a CheckpointError
that names it. Where each part was read from is logged (logger "omni_fast.model.checkpoint", level DEBUG; a stock tower
config standing in for a missing tower directory, INFO).
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import BertConfig, GenerationConfig, SiglipVisionConfig, WhisperConfig

from omni_fast.atomic import sibling
from omni_fast.config import ConfigError, ModelConfig
from omni_fast.devices import DTYPES, resolve_device, resolve_dtype
from omni_fast.model.omni import HumanOmniForCausalLM, TowerConfigs
from omni_fast.model.towers import SIGLIP_BASE_PATCH16_224, WHISPER_LARGE_V3

VISION_PREFIX = "model.vision_tower.vision_tower."
AUDIO_PREFIX = "model.audio_tower.audio_tower."
BERT_FILES = ("config.json", "vocab.txt", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json", "chat_template.jinja")
# Files that make a directory a checkpoint save_checkpoint(overwrite=True) may replace.
CHECKPOINT_MARKERS = ("config.json",)
WEIGHT_MARKERS = ("model.safetensors", "model.safetensors.index.json")
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that does not have the HumanOmni format; the message names the file, path or tensor."""


@dataclass(slots=True)
class GenerationDefaults:
    """What HF generate would take from generation_config.json when the reference calls it without them."""
    eos_token_ids: tuple[int, ...]  # generation stops at any of these
    repetition_penalty: float = 1.0  # HF applies it even when greedy
    pad_token_id: int | None = None  # filler id of finished rows
    config: GenerationConfig | None = None  # generation_config.json as transformers reads it (None: absent)


@dataclass(slots=True)
class LoadedCheckpoint:
    model: HumanOmniForCausalLM  # weights loaded, towers frozen, eval mode
    tokenizer: object  # the checkpoint's Qwen tokenizer (transformers)
    bert_tokenizer: object  # the BERT tokenizer for the gate
    config: ModelConfig  # parsed config.json
    generation: GenerationDefaults  # from generation_config.json (or config.json's eos)
    source: Path  # the checkpoint directory
    bert_dir: Path  # where the BERT config and tokenizer came from
    towers: TowerConfigs | None = None  # the tower and BERT configs the model was built with


# --- reading -----------------------------------------------------------------------------------------------------
def _unreadable(path: Path, e: BaseException) -> CheckpointError:
    """The one-line error for a file that exists but cannot be read."""
    denied = isinstance(e, PermissionError) or "permission denied" in str(e).lower() or "os error 13" in str(e)
    return CheckpointError(f"{path}: permission denied (the file exists but cannot be read)" if denied
                           else f"{path}: cannot be read ({e})")


def _open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for unreadable or corrupt files
        if isinstance(e, PermissionError) or "permission denied" in str(e).lower() or "os error 13" in str(e):
            raise _unreadable(path, e) from None
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def weight_files(root: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it, for a single-file or sharded checkpoint."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except OSError as e:
            raise _unreadable(index, e) from None
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (expected a 'weight_map' object): {e}") from None
        files = {name: root / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{index} names shard {f.name}, which is missing from {root}")
        return files
    single = root / "model.safetensors"
    if single.is_file():
        with _open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    found = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
    raise CheckpointError(f"{root}: no model.safetensors or model.safetensors.index.json (found: {found or 'none'}); "
                          "omni_fast reads safetensors checkpoints only")


def read_tensors(files: dict[str, Path], names: list[str] | None = None) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for name in names if names is not None else files:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for path, keys in by_file.items():
        with _open_safetensors(path) as f:
            try:
                out.update({k: f.get_tensor(k) for k in keys})
            except Exception as e:  # safetensors raises its own error types for corrupt data
                raise CheckpointError(f"{path}: cannot read tensors ({e})") from None
    return out


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing ({what})")
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise _unreadable(path, e) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def resolve_dir(override: str | Path | None, configured: str | None, root: Path) -> Path | None:
    """A tower/BERT directory: the explicit argument (must exist), else the configured path (absolute, or
    relative to the working directory, then to the checkpoint), else its last part inside the checkpoint, where
    save_checkpoint puts the tower configs (so a saved checkpoint loads once the configured path is gone,
    "/models/siglip-base-patch16-224" and "../models/siglip-base-patch16-224" alike). None when nothing exists."""
    if override is not None:
        path = Path(override).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such directory")
        return path
    if not configured:
        return None
    path = Path(configured).expanduser()
    tried = [path] if path.is_absolute() else [Path.cwd() / path, root / path]
    for candidate in [*tried, root / path.name]:
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
    log.info("vision tower directory %r (mm_vision_tower of %s) does not exist: siglip-base-patch16-224's config "
             "is used with the checkpoint's tower weights", cfg.mm_vision_tower, root)
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
    log.info("audio tower directory %r (mm_audio_tower of %s) does not exist: whisper-large-v3's config is used "
             "with the checkpoint's tower weights", cfg.mm_audio_tower, root)
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


def _generation_defaults(root: Path, cfg: ModelConfig, tokenizer_eos: int | None) -> GenerationDefaults:
    """generation_config.json through transformers' GenerationConfig (config.json's eos when there is none).
    The stop ids are its EOS ids plus the tokenizer's EOS: HF generate stops on the first, the reference's
    KeywordsStoppingCriteria on the second."""
    path = root / "generation_config.json"
    gen = None
    if path.is_file():
        try:
            gen = GenerationConfig.from_pretrained(str(root), local_files_only=True)
        except PermissionError as e:
            raise _unreadable(path, e) from None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable generation config ({e})") from None
    eos = gen.eos_token_id if gen is not None and gen.eos_token_id is not None else cfg.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if tokenizer_eos is not None:
        eos.append(tokenizer_eos)
    return GenerationDefaults(eos_token_ids=tuple(dict.fromkeys(int(t) for t in eos)),
                              repetition_penalty=float(getattr(gen, "repetition_penalty", None) or 1.0),
                              pad_token_id=getattr(gen, "pad_token_id", None), config=gen)


def _check_names(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], root: Path,
                 hint: str = "") -> None:
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
        raise CheckpointError(f"{root}: tensor shapes do not match config.json: {listing(bad)}{hint}")


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
    """The tokenizer class tokenizer_config.json names, its fast (tokenizers) version where transformers has one,
    as AutoTokenizer picks it (AutoTokenizer would also parse config.json, whose HumanOmni_qwen2 model type it
    does not know). transformers 4.x's slow Qwen2Tokenizer cannot decode the ids of the padded vocabulary, which
    sampling can produce; in 5.x the names are one class."""
    import transformers

    name = _read_json(directory / "tokenizer_config.json", "tokenizer config").get("tokenizer_class") or ""
    base = name.removesuffix("Fast")
    cls = getattr(transformers, f"{base}Fast", None) or getattr(transformers, base, None) if base else None
    if cls is None:
        cls = transformers.AutoTokenizer
    try:
        return cls.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory}: cannot load the tokenizer ({e})") from None


def _tower_hint(fallbacks: list[str]) -> str:
    if not fallbacks:
        return ""
    return ("; " + " and ".join(fallbacks) + " does not exist, so the stock config was assumed, which does not fit "
            "this checkpoint's tower weights: pass vision_tower= / audio_tower= (CLI: --vision_tower / "
            "--audio_tower) pointing at the tower directories")


def load_checkpoint(path: str | Path, *, bert_path: str | Path | None = None,
                    vision_tower: str | Path | None = None, audio_tower: str | Path | None = None,
                    device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LoadedCheckpoint:
    """Load a HumanOmni / R1-Omni checkpoint directory. dtype defaults to the checkpoint's torch_dtype on a GPU
    and float32 on the CPU (OmniModel.from_pretrained picks the reference's float16 for inference); device
    defaults to CUDA where present."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such checkpoint directory")
    if not (root / "config.json").exists() and (root / "adapter_config.json").is_file():
        raise CheckpointError(f"{root}: holds a LoRA adapter (adapter_config.json), not a whole model; "
                              f"`omni-fast export --merge {root} --out DIR` writes the HumanOmni checkpoint of it")
    try:
        cfg = ModelConfig.from_json(root / "config.json")
    except PermissionError as e:
        raise _unreadable(root / "config.json", e) from None
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device, cfg.torch_dtype)
    files = weight_files(root)

    vision_dir = resolve_dir(vision_tower, cfg.mm_vision_tower, root)
    audio_dir = resolve_dir(audio_tower, cfg.mm_audio_tower, root)
    fallbacks = [f"{key} directory {value!r}" for key, value, d in (
        ("mm_vision_tower", cfg.mm_vision_tower, vision_dir), ("mm_audio_tower", cfg.mm_audio_tower, audio_dir))
        if d is None]
    bert_dir = _bert_dir(bert_path, root)
    towers = TowerConfigs(vision=_vision_config(vision_dir, files, cfg, root),
                          audio=_audio_config(audio_dir, files, cfg, root),
                          bert=BertConfig(**_read_json(bert_dir / "config.json", "BERT config")))
    try:
        with torch.device("meta"):
            model = HumanOmniForCausalLM(cfg, towers)
    except ValueError as e:  # a tower config that does not fit config.json's widths
        raise CheckpointError(f"{root}: {e}{_tower_hint(fallbacks)}") from None
    expected = model.state_dict()

    names = [n for n in files if not (n == "lm_head.weight" and cfg.tie_word_embeddings)]
    state = read_tensors(files, names)
    for prefix, tower_dir, kind in ((VISION_PREFIX, vision_dir, "vision"), (AUDIO_PREFIX, audio_dir, "audio")):
        if any(k.startswith(prefix) for k in state):
            log.debug("%s tower weights: %s", kind, root)
            continue
        state.update(_tower_tensors_from_dir(tower_dir, prefix, kind))
        log.debug("%s tower weights: %s", kind, tower_dir)
        if kind == "audio":  # WhisperForAudioClassification's head is never run; its weights are not in Whisper dirs
            for k in (f"{prefix}projector.weight", f"{prefix}projector.bias", f"{prefix}classifier.weight",
                      f"{prefix}classifier.bias"):
                state.setdefault(k, torch.zeros(expected[k].shape))
    _check_names(expected, state, root, _tower_hint(fallbacks))
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    _materialize_buffers(model, device)
    model.model.vision_tower.requires_grad_(False)
    model.model.audio_tower.requires_grad_(False)
    model.eval()

    tokenizer = load_tokenizer(root)
    bert_tokenizer = load_tokenizer(bert_dir)
    log.debug("BERT config and tokenizer: %s", bert_dir)
    return LoadedCheckpoint(model=model, tokenizer=tokenizer, bert_tokenizer=bert_tokenizer, config=cfg,
                            generation=_generation_defaults(root, cfg, tokenizer.eos_token_id), source=root,
                            bert_dir=bert_dir, towers=towers)


# --- writing -----------------------------------------------------------------------------------------------------
def shard_plan(state: dict[str, torch.Tensor], shards: int = 1, max_shard_size: int | str | None = None
               ) -> list[list[str]]:
    """Tensor names per shard file, split by bytes: huggingface_hub's split (shards of at most max_shard_size,
    "5GB" or bytes; a larger tensor gets a shard of its own), or, with `shards` and no max_shard_size, that many
    shards of about equal bytes in sorted name order."""
    if max_shard_size is not None:
        from huggingface_hub import split_torch_state_dict_into_shards

        split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
        return [list(split.filename_to_tensors[f]) for f in sorted(split.filename_to_tensors)]
    names = sorted(state)
    if shards <= 1:
        return [names]
    sizes = [state[k].numel() * state[k].element_size() for k in names]
    total, start = max(1, sum(sizes)), 0
    plan: list[list[str]] = [[] for _ in range(shards)]
    for name, size in zip(names, sizes):  # each tensor goes to the shard its byte midpoint falls in
        plan[min(shards - 1, (2 * start + size) * shards // (2 * total))].append(name)
        start += size
    return [part for part in plan if part]


def write_safetensors(state: dict[str, torch.Tensor], directory: Path, shards: int = 1, *,
                      max_shard_size: int | str | None = None) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json (HumanOmni's and
    transformers' sharded layout), split by bytes: shards of at most max_shard_size, or `shards` shards of about
    equal size (tests build small sharded checkpoints that way)."""
    plan = shard_plan(state, shards, max_shard_size)
    if len(plan) == 1:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, part in enumerate(plan):
        fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        save_file({k: state[k] for k in part}, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
        total += sum(state[k].numel() * state[k].element_size() for k in part)
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def is_checkpoint(directory: Path) -> bool:
    """A directory save_checkpoint may replace: one holding a config.json and the model weights."""
    return (directory.is_dir() and all((directory / m).is_file() for m in CHECKPOINT_MARKERS)
            and any((directory / m).is_file() for m in WEIGHT_MARKERS))


def _check_target(target: Path, overwrite: bool) -> None:
    if not target.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{target}: already exists (pass overwrite=True to replace it)")
    if not is_checkpoint(target):
        raise FileExistsError(f"{target}: exists and is not a checkpoint directory (no config.json and "
                              "model.safetensors); overwrite=True only replaces a checkpoint, so nothing was touched")


def restore_aside(aside: Path, target: Path, is_complete=is_checkpoint) -> None:
    """A copy of `target` that move_into_place moved aside (.<name>.old-*) and an interruption left there: renamed
    back when `target` is missing (the save stopped between its two renames, so this is the only whole copy),
    removed when `target` is complete, else left alone."""
    if not target.exists() and is_complete(aside):
        aside.rename(target)
        log.warning("%s: restored from %s, where an interrupted save had moved it aside", target, aside.name)
    elif is_complete(target):
        shutil.rmtree(aside, ignore_errors=True)


def clean_leftovers(target: Path) -> None:
    """Tidy what an interrupted save of `target` left beside it: the hidden .<name>.tmp-* directories are
    removed, a .<name>.old-* copy is restored or removed (restore_aside)."""
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for aside in sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True):
        restore_aside(aside, target)


def _write_tower_configs(loaded: LoadedCheckpoint, tmp: Path, target: Path) -> dict[str, str]:
    """The configs of the towers the model is built with (not those of the directories it was loaded from: a
    model assembled in memory has others) in folders of the checkpoint named as config.json's tower directories;
    returns config.json's mm_vision_tower / mm_audio_tower pointing at those folders, so the saved checkpoint,
    which holds the tower weights, loads as it is, wherever the source's directories are."""
    towers = loaded.model.towers
    paths = {}
    for key, tower_cfg in (("mm_vision_tower", towers.vision), ("mm_audio_tower", towers.audio)):
        configured = getattr(loaded.config, key)
        name = Path(configured).name if configured else key.removeprefix("mm_")
        (tmp / name).mkdir(exist_ok=True)
        tower_cfg.to_json_file(str(tmp / name / "config.json"))
        paths[key] = str(target.resolve() / name)  # a moved checkpoint finds it by name (resolve_dir)
    return paths


def _source_tensor(root: Path, name: str) -> torch.Tensor | None:
    """`name` as the checkpoint directory holds it; None where it does not (any more), or cannot be read."""
    try:
        files = weight_files(root) if root.is_dir() else {}
        return read_tensors(files, [name])[name] if name in files else None
    except CheckpointError:
        return None


def _check_finite(name: str, saved: torch.Tensor, held: torch.Tensor, source: Path | None) -> None:
    """Refuse a tensor that would be written with inf/NaN its source did not have: the model's tensor `held` (the
    cast to the saved dtype overflowed), or the checkpoint directory `source` it was read from, given for weights
    loaded in float16 (loading overflowed). Checking the saved tensor first keeps this to one isfinite pass for a
    finite tensor."""
    if not saved.is_floating_point() or bool(torch.isfinite(saved).all()):
        return
    bad = ~torch.isfinite(saved)
    made = int((bad & torch.isfinite(held.cpu())).sum())
    if made:
        raise CheckpointError(f"{name}: {made} value(s) become inf/NaN when saved as {saved.dtype} "
                              f"(config.json's torch_dtype; the largest magnitude is {held.abs().max().item():g}); "
                              "nothing was written")
    stored = _source_tensor(source, name) if source is not None else None
    if stored is not None and stored.shape == saved.shape:
        made = int((bad & torch.isfinite(stored)).sum())
        if made:
            raise CheckpointError(
                f"{name}: {made} value(s) are inf/NaN here but finite in {source} (loading in float16 turned "
                f"values beyond ±65504 into inf); load it with dtype=torch.{str(saved.dtype).removeprefix('torch.')} "
                f"(CLI: --dtype {str(saved.dtype).removeprefix('torch.')}) to re-save; nothing was written")


def saved_state(loaded: LoadedCheckpoint) -> dict[str, torch.Tensor]:
    """The tensors save_checkpoint writes: on the CPU, in the config's torch_dtype. Weights loaded in float16 (the
    GPU inference default) and saved wider went through float16's range, which flushes values below ~6e-8 to
    zero and turns any beyond ±65504 into inf: that is logged, and a tensor that would be saved with inf/NaN its
    source had not is refused (_check_finite)."""
    dtype = DTYPES[loaded.config.torch_dtype]
    held = loaded.model.state_dict()
    through_fp16 = dtype != torch.float16 and any(v.dtype == torch.float16 for v in held.values())
    if through_fp16:
        name = loaded.config.torch_dtype
        log.warning("saving weights loaded in float16 as %s (config.json's torch_dtype): they went through float16, "
                    "which flushes values below 6e-8 to zero and any beyond ±65504 to inf; to re-save a checkpoint, "
                    "load it with dtype=torch.%s (CLI: --dtype %s)", name, name, name)
    # clone: packed projections come out of state_dict() as views of one tensor, which safetensors refuses
    state = {k: v.detach().to("cpu", dtype).clone() for k, v in held.items()}
    for k in state:
        _check_finite(k, state[k], held[k], loaded.source if through_fp16 else None)
    return state


def save_checkpoint(loaded: LoadedCheckpoint, directory: str | Path, *,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
                    shards: int = 1) -> Path:
    """Write `loaded.model` as a checkpoint directory in the format it was read from: config.json, safetensors in
    the config's torch_dtype (lm_head omitted when tied; sharded by bytes above max_shard_size, or into `shards`
    files), the source's tokenizer files, generation_config.json (through transformers' GenerationConfig), the
    tower configs, and bert-base-uncased/ with the BERT config and tokenizer (its weights are in the checkpoint),
    so the result loads without a bert_path and without the source's tower directories. The tower and BERT
    configs written are those of the model being saved, and config.json's tower paths point at the checkpoint's
    own tower folders.

    The directory is assembled beside the target and moved into place at the end, so an interrupted save never
    leaves a half-written checkpoint nor loses the one it replaces (move_into_place; a copy it had to leave aside
    is restored by the next save); an existing target is only replaced with overwrite=True, and only when it is
    a checkpoint directory. Tensors that would be saved as inf/NaN they were not are refused (saved_state)."""
    target = Path(directory).expanduser()
    clean_leftovers(target)  # first: a copy an interrupted save left aside is the target again
    _check_target(target, overwrite)
    state = saved_state(loaded)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(target)
    tmp.mkdir()
    try:
        write_safetensors(state, tmp, shards, max_shard_size=None if shards > 1 else max_shard_size)
        tower_dirs = _write_tower_configs(loaded, tmp, target)
        config = {**loaded.config.to_dict(), **tower_dirs}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for name in TOKENIZER_FILES:
            if (loaded.source / name).is_file():
                shutil.copy2(loaded.source / name, tmp / name)
        if loaded.generation.config is not None:
            loaded.generation.config.save_pretrained(str(tmp))
        bert = tmp / "bert-base-uncased"  # the gate's tokenizer and config travel with the checkpoint
        bert.mkdir()
        for name in BERT_FILES:
            if name != "config.json" and (loaded.bert_dir / name).is_file():
                shutil.copy2(loaded.bert_dir / name, bert / name)
        loaded.model.towers.bert.to_json_file(str(bert / "config.json"))  # the BERT the model has
        move_into_place(tmp, target)
    except BaseException:
        if target.exists() or not _aside(target).exists():  # never drop the new copy while the old is only aside
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _aside(target: Path) -> Path:
    return sibling(target, "old")


def move_into_place(tmp: Path, target: Path) -> None:
    """Rename a fully written directory onto `target`; an existing target is moved aside first and removed
    only once the new one is in place. When the second rename fails or is interrupted, the old copy is renamed
    back before the error goes on; where even that fails, it stays aside for clean_leftovers to restore."""
    old = _aside(target)
    shutil.rmtree(old, ignore_errors=True)
    try:
        if target.exists():
            target.rename(old)
        tmp.rename(target)
    except BaseException:
        if old.exists() and not target.exists():
            old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)
