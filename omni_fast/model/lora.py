"""LoRA adapters on the HumanOmni model, through the peft library (its LoraConfig and LoRA layers, injected in
place), and the adapter's files in PEFT's format.

    apply(model, r=16, alpha=32, dropout=0.0, targets=DECODER_TARGETS)   # adapters in, everything else frozen
    with disabled(model): ...              # the base weights alone: GRPO's reference model
    save_adapter(model, directory, base)   # adapter_config.json + adapter_model.safetensors (PEFT's format)
    load_adapter(model, directory)         # into a model `apply` has given the same adapters
    merge(model)                           # W + alpha / r x B A into each base linear, the adapters removed

Targets are named as in Hugging Face's Qwen2 (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj),
plus `mm_projector` and `audio_projector` for the linears of the projectors. The decoder here packs q/k/v into
one linear (qkv_proj) and gate/up into another (gate_up_proj, model/qwen2.py's pack_linears), so those are named
together or not at all: one adapter on qkv_proj, with one A and the B rows of q, k and v, is exactly three
adapters on q_proj, k_proj and v_proj sharing that A, and it is saved so (keys and target_modules in Hugging
Face's names): the files load with PeftModel.from_pretrained on the transformers model, and back here.

At the start B = 0 (peft's initialisation), so the adapted model computes what the base model does. The
adapters are applied in the linears' forward (peft's LoRA layers), in the rollout engine's decode steps too:
the optimizer updates A and B in place, so the engine's captured CUDA graphs stay valid and every rollout
samples from the weights being trained; the base weights are never written, so `disabled` gives the initial
model exactly.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from omni_fast.config import LORA_DECODER_TARGETS

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DECODER_TARGETS = LORA_DECODER_TARGETS  # the decoder's linears, Hugging Face's names
PROJECTOR_TARGETS = ("mm_projector", "audio_projector")
TARGETS = DECODER_TARGETS + PROJECTOR_TARGETS
# the packed linears of model/qwen2.py: our module name -> Hugging Face's, in the order of their output rows
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_PROJECTOR_LINEARS = {"mm_projector": r"(readout_video|readout_body|mlp_2xgelu_face)\.[02]",
                      "audio_projector": r"[02]"}
_PREFIX = "base_model.model."  # PEFT's key prefix (PeftModel wraps the model as base_model.model)


class LoraError(ValueError):
    """A LoRA setting or adapter file that does not fit; the message names it."""


def check_targets(targets: tuple[str, ...] | list[str]) -> None:
    """LoraError unless every target is known and the packed linears' parts are named together."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise LoraError(f"lora_target_modules {list(targets)}: {unknown or 'none named'}; expected names among "
                        f"{list(TARGETS)}")
    for packed, parts in PACKED.items():
        named = [p for p in parts if p in targets]
        if named and len(named) != len(parts):
            raise LoraError(f"lora_target_modules names {named} but not {[p for p in parts if p not in named]}: "
                            f"{', '.join(parts)} are one packed linear here ({packed}), adapted together or not at "
                            "all")


def _pattern(targets, hf_names: bool) -> str:
    """The regex of the adapted modules' full names (peft matches target_modules given as a string in full), in
    our module names or in Hugging Face's."""
    attn, mlp = [], []
    for ours, parts in PACKED.items():
        if parts[0] in targets:
            (attn if ours == "qkv_proj" else mlp).extend(parts if hf_names else [ours])
    attn += ["o_proj"] if "o_proj" in targets else []
    mlp += ["down_proj"] if "down_proj" in targets else []
    alternatives = []
    if attn or mlp:
        inner = ([rf"self_attn\.({'|'.join(attn)})"] if attn else []) + ([rf"mlp\.({'|'.join(mlp)})"] if mlp else [])
        alternatives.append(rf"model\.layers\.\d+\.({'|'.join(inner)})")
    alternatives += [rf"model\.{name}\.{_PROJECTOR_LINEARS[name]}" for name in PROJECTOR_TARGETS if name in targets]
    return "|".join(f"({a})" for a in alternatives)


def _lora_config(r: int, alpha: int, dropout: float, targets, hf_names: bool, base: str | None = None):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=_pattern(targets, hf_names),
                      base_model_name_or_path=base, bias="none")


def require_peft() -> None:
    """LoraError naming the missing extra unless peft imports."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise LoraError("use_peft needs the peft library: pip install 'omni_fast[peft]'") from None


def apply(model: nn.Module, r: int = 16, alpha: int = 32, dropout: float = 0.0,
          targets: tuple[str, ...] = DECODER_TARGETS) -> list[tuple[str, nn.Parameter]]:
    """Inject peft's LoRA layers into `model` (a HumanOmniForCausalLM) in place, in its parameters' dtype and
    device, and freeze everything but them; returns the adapters' (name, parameter) pairs."""
    require_peft()
    from peft import inject_adapter_in_model

    check_targets(targets)
    inject_adapter_in_model(_lora_config(r, alpha, dropout, targets, hf_names=False), model)
    adapters = []
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))
        if is_adapter(name):
            adapters.append((name, p))
    return adapters


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def layers(model: nn.Module) -> list[nn.Module]:
    """The model's LoRA layers (peft's)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def has_adapters(model: nn.Module) -> bool:
    return any(is_adapter(n) for n, _ in model.named_parameters())


@contextlib.contextmanager
def disabled(model: nn.Module):
    """The model computes with its base weights alone inside (the adapters' requires_grad restored after)."""
    found = layers(model)
    for layer in found:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in found:
            layer.enable_adapters(True)


@contextlib.contextmanager
def dropout_active(model: nn.Module):
    """The adapters' dropout on inside (the model stays in eval mode everywhere else: no other dropout)."""
    drops = [d for layer in layers(model) for d in layer.lora_dropout.values()]
    for d in drops:
        d.train()
    try:
        yield model
    finally:
        for d in drops:
            d.eval()


# --- PEFT's files ---------------------------------------------------------------------------------------------
def _split_sizes(layer: nn.Module, packed: str) -> list[int]:
    if packed == "qkv_proj":
        return list(layer.sizes)
    half = layer.gate_up_proj.get_base_layer().out_features // 2
    return [half, half]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under PEFT's keys and Hugging Face's module names ("base_model.model.<module>.
    lora_A.weight"), on the CPU: a packed linear's A is each part's, its B split by the parts' rows."""
    out = {}
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        if not is_adapter(name):
            continue
        module, kind = re.match(r"(.*)\.(lora_[AB])\.[^.]+\.weight$", name).groups()
        parent, _, leaf = module.rpartition(".")
        value = p.detach().to("cpu").clone()
        if leaf not in PACKED:
            out[f"{_PREFIX}{module}.{kind}.weight"] = value
            continue
        pieces = value.split(_split_sizes(modules[parent], leaf), dim=0) if kind == "lora_B" else \
            [value.clone() for _ in PACKED[leaf]]
        for part, piece in zip(PACKED[leaf], pieces):
            out[f"{_PREFIX}{parent}.{part}.{kind}.weight"] = piece.contiguous()
    return out


def save_adapter(model: nn.Module, directory: Path, base_model: str, settings: dict) -> None:
    """adapter_config.json (peft's LoraConfig with Hugging Face's module names; base_model_name_or_path =
    base_model) and adapter_model.safetensors into `directory`. settings: r, alpha, dropout, targets."""
    from safetensors.torch import save_file

    config = _lora_config(settings["r"], settings["alpha"], settings["dropout"], settings["targets"],
                          hf_names=True, base=base_model)
    config.save_pretrained(str(directory))
    save_file(adapter_state(model), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def read_settings(directory: Path) -> dict:
    """r, alpha, dropout, targets and base model of a saved adapter (its adapter_config.json), checked to be an
    adapter this module can load."""
    path = Path(directory) / ADAPTER_CONFIG
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoraError(f"{path}: cannot read the adapter's config ({type(e).__name__}: {e})") from None
    if raw.get("peft_type") != "LORA" or not isinstance(raw.get("target_modules"), str):
        raise LoraError(f"{path}: not a LoRA adapter written by omni_fast (peft_type LORA, target_modules a "
                        "pattern of Hugging Face module names)")
    pattern = raw["target_modules"]
    targets = tuple(t for t in TARGETS if re.search(rf"(?<![A-Za-z_]){t}(?![A-Za-z_])", pattern))
    check_targets(targets)
    if _pattern(targets, hf_names=True) != pattern:
        raise LoraError(f"{path}: target_modules {pattern!r} is not a set of omni_fast's targets")
    return {"r": raw["r"], "alpha": raw["lora_alpha"], "dropout": raw.get("lora_dropout", 0.0), "targets": targets,
            "base_model": raw.get("base_model_name_or_path")}


def load_adapter(model: nn.Module, directory: Path) -> None:
    """adapter_model.safetensors into the adapters of `model` (given the same ones by `apply`), in place; a
    packed linear's parts must share their A (as save_adapter writes them)."""
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTER_WEIGHTS
    try:
        saved = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a missing or damaged file
        raise LoraError(f"{path}: cannot be read ({e})") from None
    wanted = adapter_state(model)
    if set(saved) != set(wanted):
        missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
        raise LoraError(f"{path}: does not fit this model's adapters (missing {missing[:3]}, unexpected {extra[:3]})")
    for key in saved:
        if saved[key].shape != wanted[key].shape:
            raise LoraError(f"{path}: {key} has shape {tuple(saved[key].shape)}, this model's "
                            f"{tuple(wanted[key].shape)} (another lora_r?)")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not is_adapter(name):
                continue
            module, kind = re.match(r"(.*)\.(lora_[AB])\.[^.]+\.weight$", name).groups()
            parent, _, leaf = module.rpartition(".")
            if leaf not in PACKED:
                p.copy_(saved[f"{_PREFIX}{module}.{kind}.weight"])
                continue
            parts = [saved[f"{_PREFIX}{parent}.{part}.{kind}.weight"] for part in PACKED[leaf]]
            if kind == "lora_A":
                if any(not torch.equal(parts[0], other) for other in parts[1:]):
                    raise LoraError(f"{path}: {', '.join(PACKED[leaf])} of {parent} have different lora_A; they are "
                                    f"one packed linear here ({leaf}) and must share it")
                p.copy_(parts[0])
            else:
                p.copy_(torch.cat(parts, dim=0))


# --- merging -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Replace each LoRA layer by its base linear holding W + scaling x B A (computed in float32, stored in W's
    dtype): the plain model computing what the adapted one did. In place; returns the model."""
    from peft.tuners.lora import LoraLayer

    modules = dict(model.named_modules())
    for name, layer in modules.items():
        if isinstance(layer, LoraLayer):
            base = layer.get_base_layer()
            for adapter in layer.active_adapters:
                a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
                delta = (b.float() @ a.float()) * layer.scaling[adapter]
                base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
            parent, _, leaf = name.rpartition(".")
            setattr(modules[parent] if parent else model, leaf, base)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def merged_checkpoint(adapter_dir: str | Path, out: str | Path, base: str | Path | None = None,
                      bert_path: str | Path | None = None, overwrite: bool = False, dtype: str | None = None) -> Path:
    """Write a HumanOmni checkpoint at `out`: the base model (`base`, default the adapter's
    base_model_name_or_path) with the adapter of `adapter_dir` merged in, in float32 on the CPU, saved in `dtype`
    ("bfloat16", "float16", "float32"; default the base checkpoint's torch_dtype) by model/checkpoint.py's
    save_checkpoint."""
    import dataclasses

    from omni_fast.model.checkpoint import load_checkpoint, save_checkpoint

    adapter_dir = Path(adapter_dir).expanduser()
    settings = read_settings(adapter_dir)
    base = base or settings["base_model"]
    if not base:
        raise LoraError(f"{adapter_dir / ADAPTER_CONFIG}: names no base model (base_model_name_or_path); give it "
                        "(--model_path)")
    loaded = load_checkpoint(base, bert_path=bert_path, device="cpu", dtype=torch.float32)
    apply(loaded.model, settings["r"], settings["alpha"], 0.0, settings["targets"])
    load_adapter(loaded.model, adapter_dir)
    merge(loaded.model)
    if dtype is not None:
        loaded = dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, torch_dtype=dtype))
    return save_checkpoint(loaded, out, overwrite=overwrite)
