"""HumanOmni-0.5B / R1-Omni-0.5B: the Qwen2 decoder with its encoders, projectors and BERT gate.

The module tree is the checkpoint's (docs/REFERENCE.md §1): `model.{embed_tokens,layers,norm}` for the
decoder, `model.vision_tower`, `model.mm_projector`, `model.bert_model`, `model.bert_gate`,
`model.audio_tower`, `model.audio_projector` beside it, and the LM head tied to `model.embed_tokens`.

The encode steps are split where the gradient stops, so a trainer can cache the frozen tower outputs once per
clip and run only the trainable part per step:
    frames --vision_features (frozen)--> project_video(+ BERT gate) --> 392 embeddings
    mel    --audio_features (frozen)---> project_audio              --> 500 embeddings
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import BertConfig, BertModel, SiglipVisionConfig, WhisperConfig

from omni_fast.config import AUDIO_TOKEN_INDEX, VIDEO_TOKEN_INDEX, ModelConfig
from omni_fast.model.fusion import branch_weights, build_bert_gate, fuse_branches, gate_inputs
from omni_fast.model.projector import AllInOneSmall, mlp2x_gelu
from omni_fast.model.qwen2 import Qwen2Decoder, Qwen2LM
from omni_fast.model.towers import SiglipTower, WhisperTower


@dataclass(slots=True)
class TowerConfigs:
    vision: SiglipVisionConfig  # SigLIP vision config (from the mm_vision_tower directory)
    audio: WhisperConfig  # Whisper config (from the mm_audio_tower directory)
    bert: BertConfig  # BERT config (from the BERT directory)


class HumanOmniBackbone(Qwen2Decoder):
    """`model.*`: the decoder plus every multimodal part, as HumanOmniQwen2Model holds them."""

    def __init__(self, cfg: ModelConfig, towers: TowerConfigs):
        super().__init__(cfg)
        if towers.vision.hidden_size != cfg.mm_hidden_size:
            raise ValueError(f"vision tower width {towers.vision.hidden_size} != mm_hidden_size {cfg.mm_hidden_size}")
        if towers.audio.d_model != cfg.audio_hidden_size:
            raise ValueError(f"audio tower width {towers.audio.d_model} != audio_hidden_size {cfg.audio_hidden_size}")
        towers.bert._attn_implementation = "sdpa"
        self.vision_tower = SiglipTower(towers.vision, cfg.mm_vision_select_layer)
        self.mm_projector = AllInOneSmall(cfg.mm_hidden_size, cfg.hidden_size)
        self.bert_model = BertModel(towers.bert, add_pooling_layer=True)
        self.bert_gate = build_bert_gate(towers.bert.hidden_size)
        self.audio_tower = WhisperTower(towers.audio)
        self.audio_projector = mlp2x_gelu(cfg.audio_hidden_size, cfg.hidden_size)


class HumanOmniForCausalLM(Qwen2LM):
    def __init__(self, cfg: ModelConfig, towers: TowerConfigs):
        super().__init__(cfg, HumanOmniBackbone(cfg, towers))
        self.towers = towers

    @property
    def num_video_tokens(self) -> int:
        side = (self.model.vision_tower.patches_per_side + 1) // 2
        return self.config.num_frames * side * side

    @property
    def num_audio_tokens(self) -> int:
        return self.towers.audio.max_source_positions // 3

    # --- video -------------------------------------------------------------------------------------------
    def vision_features(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, T, 3, 224, 224) normalised -> SigLIP features (B, T, 196, mm_hidden). Frozen, no grad."""
        b, t = frames.shape[:2]
        feats = self.model.vision_tower(frames.flatten(0, 1))  # (B*T, 196, mm_hidden)
        return feats.view(b, t, *feats.shape[1:])

    def bert_inputs(self, tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
        """The gate's BERT inputs for instruct texts, one row each, never longer than this BERT's positions
        (fusion.gate_inputs), on the model's device."""
        positions, device = self.towers.bert.max_position_embeddings, self.model.embed_tokens.weight.device
        return gate_inputs(tokenizer, texts, positions, device)

    def gate_weights(self, bert_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokenised instruct texts -> branch weights (B, 3)."""
        return branch_weights(self.model.bert_model, self.model.bert_gate, bert_inputs)

    def project_video(self, feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """SigLIP features (B, T, 196, mm) + branch weights (B, 3) -> visual embeddings (B, 392, hidden)."""
        feats = feats.to(self.model.embed_tokens.weight.dtype)
        video, body, face = self.model.mm_projector(feats)
        return fuse_branches(video, body, face, weights)

    # --- audio -------------------------------------------------------------------------------------------
    def audio_features(self, mel: torch.Tensor) -> torch.Tensor:
        """log-mel (B, n_mels, 3000) -> pooled Whisper features (B, 500, audio_hidden). Frozen, no grad."""
        return self.model.audio_tower(mel)

    def project_audio(self, feats: torch.Tensor) -> torch.Tensor:
        return self.model.audio_projector(feats.to(self.model.embed_tokens.weight.dtype))

    # --- the prompt ----------------------------------------------------------------------------------------
    def prompt_embeddings(self, prompt_ids: list[torch.Tensor], vision: torch.Tensor | None,
                          audio: torch.Tensor | None, bert_inputs: dict[str, torch.Tensor] | None = None,
                          rows: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Prompt ids [T_i] (with -201 / -202) + the frozen towers' features of B clips (vision (B, T, 196, mm)
        and / or audio (B, 500, audio_hidden); None: that input is absent) -> spliced embeddings (T_i', H) per
        clip, differentiable through the projectors, BERT and gate (whatever of them requires grad). bert_inputs
        (for the video branch): one row per clip, one row for all, or one row per distinct instruct with `rows`
        (B,) naming each clip's."""
        video = aud = None
        if vision is not None:
            weights = self.gate_weights(bert_inputs)                     # (rows of bert_inputs, 3)
            if rows is not None:
                weights = weights[rows]
            elif weights.shape[0] == 1 and vision.shape[0] > 1:
                weights = weights.expand(vision.shape[0], -1)
            video = self.project_video(vision, weights)                  # (B, 392, H)
        if audio is not None:
            aud = self.project_audio(audio)                              # (B, 500, H)
        return [self.splice(ids, None if video is None else video[i], None if aud is None else aud[i])
                for i, ids in enumerate(prompt_ids)]

    def copy_sharing_towers(self) -> HumanOmniForCausalLM:
        """A deep copy that shares this model's (frozen) towers rather than copying them: the reference model
        and the sharded policy cost no second SigLIP and Whisper."""
        towers = (self.model.vision_tower, self.model.audio_tower)
        return copy.deepcopy(self, memo={id(t): t for t in towers})

    # --- splicing ----------------------------------------------------------------------------------------
    def splice(self, input_ids: torch.Tensor, video: torch.Tensor | None = None,
               audio: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [T] holding -201 / -202 placeholders -> embeddings [T', hidden], each placeholder replaced
        by the clip's video (392, hidden) or audio (500, hidden) embeddings (prepare_inputs_labels_for_multimodal)."""
        if input_ids.dim() != 1:
            raise ValueError(f"splice takes one sequence of ids [T], got shape {tuple(input_ids.shape)}")
        is_video, is_audio = input_ids == VIDEO_TOKEN_INDEX, input_ids == AUDIO_TOKEN_INDEX
        for name, mask, emb in (("video (-201)", is_video, video), ("audio (-202)", is_audio, audio)):
            if bool(mask.any()) and emb is None:
                raise ValueError(f"the prompt holds a {name} placeholder but no {name.split()[0]} input was given")
        text = self.embed(input_ids.clamp(min=0))  # (T, hidden); placeholder rows are replaced below
        pieces, start = [], 0
        for pos in torch.nonzero(is_video | is_audio).flatten().tolist():
            pieces.append(text[start:pos])
            pieces.append((video if bool(is_video[pos]) else audio).to(text.dtype))
            start = pos + 1
        pieces.append(text[start:])
        return torch.cat(pieces, dim=0)
