"""The frozen encoders: SigLIP (video frames) and the Whisper encoder (audio), built from transformers' classes.

The module trees reproduce the names a HumanOmni checkpoint stores them under
(`model.vision_tower.vision_tower.vision_model.*`, `model.audio_tower.audio_tower.{encoder,projector,classifier}.*`,
docs/REFERENCE.md §1), whatever layout the installed transformers gives SiglipVisionModel. The unused parts
(SigLIP's last layer, post_layernorm and pooling head; Whisper's classification projector and classifier) are
kept so that a checkpoint round-trips exactly, but never run: SigLIP runs only the layers up to
`mm_vision_select_layer` (11 of 12 for the 0.5B).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SiglipVisionConfig, WhisperConfig
from transformers.models.siglip import modeling_siglip
from transformers.models.whisper.modeling_whisper import WhisperEncoder

# The towers R1-Omni-0.5B was built on, for checkpoints that carry the tower weights but whose tower
# directories are absent (their config.json would be the only thing read from there).
SIGLIP_BASE_PATCH16_224 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                               layer_norm_eps=1e-6)
WHISPER_LARGE_V3 = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                        decoder_layers=32, decoder_attention_heads=20, decoder_ffn_dim=5120, num_mel_bins=128,
                        max_source_positions=1500, vocab_size=51866, activation_function="gelu",
                        scale_embedding=False)


def _sdpa(config):
    try:
        config._attn_implementation = "sdpa"
    except (AttributeError, ValueError):  # older transformers resolve it at model init
        pass
    return config


class _Container(nn.Module):
    def __init__(self, **children: nn.Module):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


class SiglipTower(nn.Module):
    """frames (N, 3, 224, 224), normalised -> hidden_states[select_layer] (N, 196, width), no post-layernorm."""

    def __init__(self, config: SiglipVisionConfig, select_layer: int = -2):
        super().__init__()
        config = _sdpa(config)
        self.config = config
        num_layers = config.num_hidden_layers
        # hidden_states = (embeddings, layer 1, ..., layer L): index s selects the output of layer (L + 1 + s).
        self.num_layers_run = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
        if not 0 <= self.num_layers_run <= num_layers:
            raise ValueError(f"mm_vision_select_layer {select_layer} is out of range for {num_layers} SigLIP layers")
        vision_model = _Container(
            embeddings=modeling_siglip.SiglipVisionEmbeddings(config),
            encoder=modeling_siglip.SiglipEncoder(config),
            post_layernorm=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
            head=modeling_siglip.SiglipMultiheadAttentionPoolingHead(config))
        self.vision_tower = _Container(vision_model=vision_model)

    @property
    def patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        vm = self.vision_tower.vision_model
        x = vm.embeddings(frames.to(vm.embeddings.patch_embedding.weight.dtype))
        for layer in vm.encoder.layers[: self.num_layers_run]:
            out = layer(x, None)
            x = out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple
        return x


class WhisperTower(nn.Module):
    """log-mel (N, n_mels, 3000) -> encoder last_hidden_state (N, 1500, d_model) -> avg-pooled by 3 (N, 500, d)."""

    def __init__(self, config: WhisperConfig):
        super().__init__()
        config = _sdpa(config)
        self.config = config
        proj = getattr(config, "classifier_proj_size", 256)
        self.audio_tower = _Container(
            encoder=WhisperEncoder(config),
            projector=nn.Linear(config.d_model, proj),
            classifier=nn.Linear(proj, getattr(config, "num_labels", 2)))

    @torch.no_grad()
    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        encoder = self.audio_tower.encoder
        hidden = encoder(mel.to(encoder.conv1.weight.dtype)).last_hidden_state  # (N, 1500, d)
        return F.avg_pool1d(hidden.transpose(1, 2), kernel_size=3, stride=3).transpose(1, 2)  # (N, 500, d)
