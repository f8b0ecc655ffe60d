"""The HumanOmni model composed from transformers' own classes and plain-torch projector functions, straight
from a checkpoint's safetensors: the independent reference omni_fast's model is tested against.

Nothing here imports omni_fast's model code: the projector is re-derived from the reference's structure
(timm RegStage as used by AllInOneSmall) as functions over the state dict, written frame by frame.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import (BertConfig, BertModel, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig,
                          SiglipVisionModel, WhisperConfig)
from transformers.models.whisper.modeling_whisper import WhisperEncoder


def read_all(root: Path) -> dict[str, torch.Tensor]:
    index = root / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for f in files:
        with safe_open(str(root / f), framework="pt") as h:
            out.update({k: h.get_tensor(k).float() for k in h.keys()})
    return out


def sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_into(module: torch.nn.Module, state: dict, drop_prefix: str = "", tied: tuple[str, ...] = ()) -> torch.nn.Module:
    """Load `state` into a transformers module whatever its layout: keys are matched as given, or with
    `drop_prefix` removed (transformers 5 flattens SiglipVisionModel's vision_model)."""
    expected = set(module.state_dict())
    if not expected & set(state) and drop_prefix:
        state = {k[len(drop_prefix):] if k.startswith(drop_prefix) else k: v for k, v in state.items()}
    missing = module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False).missing_keys
    assert not set(missing) - set(tied), missing
    return module


# --- projector, as functions -----------------------------------------------------------------------------------
def _layer_norm_2d(x, w, b, act):
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, 1e-5).permute(0, 3, 1, 2)
    return F.silu(y) if act else y


def _bottleneck(x, sd, p):
    out_c = sd[p + "conv1.conv.weight"].shape[0]
    y = _layer_norm_2d(F.conv2d(x, sd[p + "conv1.conv.weight"]), sd[p + "conv1.bn.weight"], sd[p + "conv1.bn.bias"], True)
    y = F.conv2d(y, sd[p + "conv2.conv.weight"], padding=1, groups=out_c)
    y = _layer_norm_2d(y, sd[p + "conv2.bn.weight"], sd[p + "conv2.bn.bias"], True)
    s = y.mean(dim=(2, 3), keepdim=True)
    s = F.conv2d(F.silu(F.conv2d(s, sd[p + "se.fc1.weight"], sd[p + "se.fc1.bias"])), sd[p + "se.fc2.weight"],
                 sd[p + "se.fc2.bias"])
    y = y * torch.sigmoid(s)
    y = _layer_norm_2d(F.conv2d(y, sd[p + "conv3.conv.weight"]), sd[p + "conv3.bn.weight"], sd[p + "conv3.bn.bias"], False)
    if p + "downsample.conv.weight" in sd:
        short = _layer_norm_2d(F.conv2d(x, sd[p + "downsample.conv.weight"]), sd[p + "downsample.bn.weight"],
                               sd[p + "downsample.bn.bias"], False)
    else:
        short = x
    return F.silu(y + short)


def regstage(x, sd, prefix):
    b = 1
    while f"{prefix}b{b}.conv1.conv.weight" in sd:
        x = _bottleneck(x, sd, f"{prefix}b{b}.")
        b += 1
    return x


def mlp(x, sd, prefix):
    return F.linear(F.gelu(F.linear(x, sd[prefix + "0.weight"], sd[prefix + "0.bias"])), sd[prefix + "2.weight"],
                    sd[prefix + "2.bias"])


def branch(feats, sd, name):
    """feats (T, 196, C) of one clip -> (T*49, hidden)."""
    t, n, c = feats.shape
    side = int(n ** 0.5)
    frames = [regstage(feats[i].T.reshape(1, c, side, side), sd, f"s1_{name}.") for i in range(t)]  # T x (1, D, h, w)
    vol = torch.stack([f[0] for f in frames], dim=1)[None]  # (1, D, T, h, w)
    w3, b3 = sd[f"sampler_{name}.0.weight"], sd[f"sampler_{name}.0.bias"]
    padded = torch.cat([torch.zeros_like(vol[:, :, :1]), vol], dim=2)  # zero frame at t = -1
    outs = [F.silu(F.conv3d(padded[:, :, i:i + 2], w3, b3, stride=(1, 2, 2)))[:, :, 0] for i in range(t)]
    tokens = []
    for o in outs:
        o = regstage(o, sd, f"s2_{name}.")  # (1, D, h/2, w/2)
        tokens.append(o[0].flatten(1).T)  # (h/2*w/2, D), row-major over (h, w)
    return mlp(torch.cat(tokens), sd, f"readout_{name}.")


def face(feats, sd):
    y = mlp(feats, sd, "mlp_2xgelu_face.")  # (T, 196, D)
    t, n, d = y.shape
    side = int(n ** 0.5)
    grid = y.reshape(t, side, side, d).permute(0, 3, 1, 2)
    pooled = F.interpolate(grid, size=[(side + 1) // 2] * 2, mode="bilinear")
    return pooled.permute(0, 2, 3, 1).reshape(-1, d)


# --- the whole model -------------------------------------------------------------------------------------------
class ReferenceOmni:
    def __init__(self, root: Path, bert_dir: Path):
        cfg = json.loads((root / "config.json").read_text())
        self.cfg = cfg
        state = read_all(root)
        self.state = state
        vdir, adir = Path(cfg["mm_vision_tower"]), Path(cfg["mm_audio_tower"])
        vcfg = json.loads((vdir / "config.json").read_text())["vision_config"]
        vcfg = SiglipVisionConfig(**{k: v for k, v in vcfg.items() if k != "model_type"})
        self.siglip = load_into(SiglipVisionModel(vcfg), sub(state, "model.vision_tower.vision_tower."),
                                "vision_model.").eval()
        acfg = WhisperConfig(**{k: v for k, v in json.loads((adir / "config.json").read_text()).items()
                                if k not in ("model_type", "architectures")})
        self.whisper = load_into(WhisperEncoder(acfg), sub(state, "model.audio_tower.audio_tower.encoder.")).eval()
        bcfg = BertConfig(**json.loads((bert_dir / "config.json").read_text()))
        self.bert = load_into(BertModel(bcfg), sub(state, "model.bert_model.")).eval()
        qcfg = Qwen2Config(**{k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "num_attention_heads", "num_key_value_heads", "rope_theta",
                                                  "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")})
        self.llm = load_into(Qwen2ForCausalLM(qcfg), {k: v for k, v in state.items()
                                                       if k.startswith(("model.embed_tokens", "model.layers.", "model.norm."))},
                             tied=("lm_head.weight",))
        self.llm.tie_weights()
        self.llm.eval()
        self.proj = sub(state, "model.mm_projector.")
        self.audio_proj = sub(state, "model.audio_projector.")
        self.gate = sub(state, "model.bert_gate.")

    @torch.no_grad()
    def video_embeddings(self, frames: torch.Tensor, bert_inputs: dict) -> torch.Tensor:
        """frames (8, 3, 224, 224) -> (392, hidden)."""
        feats = self.siglip(frames, output_hidden_states=True).hidden_states[-2]  # (T, 196, C)
        cls = self.bert(**bert_inputs).last_hidden_state[:, 0]
        w = torch.softmax(mlp(cls, self.gate, ""), dim=1)[0]
        return branch(feats, self.proj, "video") * w[0] + branch(feats, self.proj, "body") * w[1] + face(feats, self.proj) * w[2]

    @torch.no_grad()
    def audio_embeddings(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (128, 3000) -> (500, hidden)."""
        h = self.whisper(mel[None]).last_hidden_state  # (1, 1500, d)
        pooled = F.avg_pool1d(h.transpose(1, 2), 3, 3).transpose(1, 2)[0]
        return mlp(pooled, self.audio_proj, "")

    def embeddings(self, ids: list[int], frames, mel, bert_inputs) -> torch.Tensor:
        emb = self.llm.get_input_embeddings()
        pieces = []
        for i in ids:
            if i == -201:
                pieces.append(self.video_embeddings(frames, bert_inputs))
            elif i == -202:
                pieces.append(self.audio_embeddings(mel))
            else:
                pieces.append(emb(torch.tensor([i])).detach())
        return torch.cat(pieces)

    @torch.no_grad()
    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.llm(inputs_embeds=embeds[None]).logits

    @torch.no_grad()
    def greedy(self, embeds: torch.Tensor, max_new_tokens: int, eos: list[int], repetition_penalty: float,
               pad: int) -> list[int]:
        out = self.llm.generate(inputs_embeds=embeds[None], max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=eos, pad_token_id=pad, repetition_penalty=repetition_penalty)
        ids = out[0].tolist()
        return ids[: next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))]
