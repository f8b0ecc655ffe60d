"""Tiny checkpoints in the real HumanOmni / R1-Omni format, and synthetic clips, for tests and the demo.

`make_tiny_checkpoint` writes what a real R1-Omni-0.5B directory holds (docs/REFERENCE.md §1), at tiny sizes:
config.json with every real key, model.safetensors in bf16 with the real tensor names (the LLM without lm_head,
tower copies under model.vision_tower / model.audio_tower, the trained BERT under model.bert_model, the
projectors and the gate), a byte-level BPE tokenizer trained in-process that carries the Qwen2.5 special
tokens and a Qwen-style chat template, generation_config.json, and beside them the three directories the
reference reads from: a SigLIP checkpoint (full SiglipModel, text tower included), a Whisper checkpoint
(WhisperForConditionalGeneration) and bert-base-uncased (whose weights differ from the checkpoint's trained
BERT, as in R1-Omni). The tensors are made by transformers' own classes wherever one exists; the projector's
names and shapes come from the documented layout below, not from omni_fast's modules, so loading them checks
omni_fast against the format rather than against itself.
"""
from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from omni_fast.task import EMOTION_LABELS

QWEN_SPECIAL_TOKENS = [  # Qwen2.5's added tokens, in id order (151643 ... 151664 in the real vocabulary)
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", True), ("<|fim_middle|>", True), ("<|fim_suffix|>", True), ("<|fim_pad|>", True),
    ("<|repo_name|>", True), ("<|file_sep|>", True),
]
QWEN_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                          r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Renders a plain conversation exactly as Qwen2.5's template does (default system prompt included).
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_CORPUS = [
    "As an emotional recognition expert; throughout the video, which emotion conveyed by the characters is the "
    "most obvious to you?\nOutput the thinking process in <think> </think> and final emotion in <answer> </answer> "
    "tags.",
    "<vi_start><video><vi_end>\n<au_start><audio><au_end>\n",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant. You are a helpful assistant.",
    "<think>The man frowns and his voice is loud, so he seems angry.</think>\n<answer>angry</answer>",
    "<think>She smiles and laughs; the tone of her voice is bright.</think>\n<answer>happy</answer>",
    "In the video, the woman lowers her head and speaks slowly, tears in her eyes, which suggests sadness.",
    "The facial expression, the body language and the tone of the speech together reveal the emotion.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 2025; punctuation , . ; : ! ? ( ) [ ] { } ' \" - _ / \\ < > = + * & % $ # @",
    " ".join(EMOTION_LABELS), "When the characters display their emotions, which predominant feeling is most clearly expressed?",
]
_BERT_WORDS = ("as an emotional recognition expert throughout the video which emotion conveyed by characters is most "
               "obvious to you output thinking process in think and final answer tags when display their "
               "predominant feeling clearly expressed").split()

# Tiny sizes. The decoder keeps Qwen2.5-0.5B's ratios (GQA 2:1 here, head_dim 16); the encoders keep the real
# input geometry (224 px / patch 16 -> 196 patches; 128 mel bins x 3000 frames -> 1500 -> 500 tokens).
TINY = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, bpe_vocab=800,
            siglip_hidden=32, siglip_layers=3, whisper_hidden=48, whisper_layers=2, bert_hidden=32, bert_layers=2)


QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, mm_hidden_size=768, rope_theta=1e6)
TINY_DECODER = dict(hidden_size=112, intermediate_size=128, num_hidden_layers=2, num_attention_heads=14,
                    num_key_value_heads=2, vocab_size=1000, mm_hidden_size=32)


def random_decoder(shape: dict, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   seed: int = 0):
    """A Qwen2 decoder (omni_fast's) with random weights, e.g. shape=QWEN25_05B for the R1-Omni-0.5B LLM. The
    embedding has std 0.1 so logits are spread enough for greedy decoding to be stable across kernels."""
    from omni_fast.config import ModelConfig
    from omni_fast.model.qwen2 import Qwen2LM

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2LM(ModelConfig(**shape))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.1 if "embed" in name else 0.02)
    return model.to(dtype).eval()


def transformers_twin(model):
    """transformers' Qwen2ForCausalLM holding the same weights as an omni_fast Qwen2LM (tied head)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = model.config
    hf_cfg = Qwen2Config(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, vocab_size=c.vocab_size, rope_theta=c.rope_theta,
                         rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
                         tie_word_embeddings=True)
    weight = model.lm_head_weight
    with torch.device(weight.device):
        hf = Qwen2ForCausalLM(hf_cfg).to(weight.dtype)
    missing = hf.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert missing == ["lm_head.weight"], missing  # tied to the embedding
    hf.tie_weights()
    return hf.eval()


def _randn(gen: torch.Generator, *shape: int, std: float = 0.05) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def _randomize(module: torch.nn.Module, gen: torch.Generator, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Fresh seeded values for every tensor of `module` (norm weights near 1), as a state dict."""
    out = {}
    for name, t in module.state_dict().items():
        if name.endswith(("layernorm.weight", "layer_norm.weight", "LayerNorm.weight", "norm.weight",
                          "layer_norm1.weight", "layer_norm2.weight", "final_layer_norm.weight")):
            out[name] = 1.0 + _randn(gen, *t.shape, std=0.1)
        elif t.is_floating_point():
            out[name] = _randn(gen, *t.shape, std=std)
        else:
            out[name] = t.clone()
    return out


def projector_tensor_shapes(mm_hidden: int, hidden: int, depth: int = 2) -> dict[str, tuple[int, ...]]:
    """Names and shapes of `model.mm_projector.*` for all_in_one_small (docs/REFERENCE.md §2): timm RegStage
    blocks b1..b{depth} (bottle_ratio 1, depthwise conv2, SE width round(0.25 x block input), conv1x1+LN
    shortcut only where the width changes, no conv bias), the causal Conv3d samplers, the readouts and the
    face MLP."""
    shapes: dict[str, tuple[int, ...]] = {}
    for branch in ("video", "body"):
        for stage, stage_in in (("s1", mm_hidden), ("s2", hidden)):
            for b in range(1, depth + 1):
                cin = stage_in if b == 1 else hidden
                p = f"{stage}_{branch}.b{b}."
                rd = int(round(cin * 0.25))
                shapes[p + "conv1.conv.weight"] = (hidden, cin, 1, 1)
                shapes[p + "conv2.conv.weight"] = (hidden, 1, 3, 3)
                shapes[p + "se.fc1.weight"], shapes[p + "se.fc1.bias"] = (rd, hidden, 1, 1), (rd,)
                shapes[p + "se.fc2.weight"], shapes[p + "se.fc2.bias"] = (hidden, rd, 1, 1), (hidden,)
                shapes[p + "conv3.conv.weight"] = (hidden, hidden, 1, 1)
                norms = ["conv1", "conv2", "conv3"]
                if cin != hidden:
                    shapes[p + "downsample.conv.weight"] = (hidden, cin, 1, 1)
                    norms.append("downsample")
                for n in norms:
                    shapes[p + f"{n}.bn.weight"], shapes[p + f"{n}.bn.bias"] = (hidden,), (hidden,)
        shapes[f"sampler_{branch}.0.weight"], shapes[f"sampler_{branch}.0.bias"] = (hidden, hidden, 2, 2, 2), (hidden,)
        for i in (0, 2):
            shapes[f"readout_{branch}.{i}.weight"], shapes[f"readout_{branch}.{i}.bias"] = (hidden, hidden), (hidden,)
    shapes["mlp_2xgelu_face.0.weight"], shapes["mlp_2xgelu_face.0.bias"] = (hidden, mm_hidden), (hidden,)
    shapes["mlp_2xgelu_face.2.weight"], shapes["mlp_2xgelu_face.2.bias"] = (hidden, hidden), (hidden,)
    return shapes


def _projector_tensors(mm_hidden: int, hidden: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape in projector_tensor_shapes(mm_hidden, hidden).items():
        if ".bn.weight" in name:
            out[name] = 1.0 + _randn(gen, *shape, std=0.1)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 16
            out[name] = _randn(gen, *shape, std=0.5 / math.sqrt(fan_in)) if len(shape) > 1 else _randn(gen, *shape)
    return out


def write_qwen_tokenizer(directory: Path, bpe_vocab: int = TINY["bpe_vocab"]) -> int:
    """Train a byte-level BPE with Qwen2's pre-tokenizer, append the Qwen2.5 special tokens after it, and save the
    files a Qwen2.5 checkpoint carries. Returns the number of tokens (BPE + special)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    n_bpe = tok.get_vocab_size()
    tok.add_tokens([AddedToken(t, special=s, normalized=False, single_word=False, lstrip=False, rstrip=False)
                    for t, s in QWEN_SPECIAL_TOKENS])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    tok.model.save(str(directory))  # vocab.json + merges.txt
    added = {tok.token_to_id(t): t for t, _ in QWEN_SPECIAL_TOKENS}
    (directory / "added_tokens.json").write_text(json.dumps({t: i for i, t in added.items()}, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                                      "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
                                      "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                                      "<|video_pad|>"],
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, indent=2))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": dict(QWEN_SPECIAL_TOKENS)[t]}
                                 for i, t in added.items()},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                                      "<|video_pad|>"],
        "bos_token": None, "chat_template": QWEN_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 2048, "pad_token": "<|endoftext|>",
        "padding_side": "right", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None}, indent=2))
    return n_bpe + len(QWEN_SPECIAL_TOKENS)


def _write_bert(directory: Path, gen: torch.Generator) -> tuple[dict, dict[str, torch.Tensor]]:
    """A tiny bert-base-uncased directory (WordPiece vocab, config, weights). Returns (config dict, weights)."""
    from transformers import BertConfig, BertModel

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()<>/-_")
    vocab = (["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [f"##{c}" for c in chars]
             + sorted(set(_BERT_WORDS) | set(EMOTION_LABELS)))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "do_lower_case": True, "model_max_length": 512, "tokenizer_class": "BertTokenizer",
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]"}, indent=2))
    cfg = dict(architectures=["BertForMaskedLM"], model_type="bert", vocab_size=len(vocab),
               hidden_size=TINY["bert_hidden"], num_hidden_layers=TINY["bert_layers"], num_attention_heads=2,
               intermediate_size=2 * TINY["bert_hidden"], max_position_embeddings=128, type_vocab_size=2,
               hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    template = BertModel(BertConfig(**cfg), add_pooling_layer=True)
    save_file(_randomize(template, gen), str(directory / "model.safetensors"))  # stock weights ...
    return cfg, _randomize(template, gen)  # ... and different "trained" ones for the checkpoint


def _write_siglip(directory: Path, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A tiny google/siglip-base-patch16-224 directory (SiglipModel: text + vision). Returns its vision tensors."""
    from transformers import SiglipConfig, SiglipModel

    vision = dict(hidden_size=TINY["siglip_hidden"], intermediate_size=2 * TINY["siglip_hidden"],
                  num_hidden_layers=TINY["siglip_layers"], num_attention_heads=2, image_size=224, patch_size=16,
                  hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, model_type="siglip_vision_model")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                max_position_embeddings=16, model_type="siglip_text_model", pad_token_id=1, bos_token_id=2,
                eos_token_id=3)
    cfg = dict(architectures=["SiglipModel"], model_type="siglip", text_config=text, vision_config=vision)
    state = _randomize(SiglipModel(SiglipConfig(text_config=text, vision_config=vision)), gen)
    state = {k if k.startswith(("vision_model.", "text_model.", "logit_")) else f"vision_model.{k}": v
             for k, v in state.items()}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 3,
        "rescale_factor": 1 / 255, "size": {"height": 224, "width": 224}}, indent=2))
    save_file(state, str(directory / "model.safetensors"))
    return {k: v for k, v in state.items() if k.startswith("vision_model.")}


def _write_whisper(directory: Path, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A tiny openai/whisper-large-v3 directory (WhisperForConditionalGeneration, 128 mel bins). Returns the
    encoder tensors under `encoder.*`."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    d = TINY["whisper_hidden"]
    cfg = dict(architectures=["WhisperForConditionalGeneration"], model_type="whisper", d_model=d,
               encoder_layers=TINY["whisper_layers"], decoder_layers=1, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=2 * d, decoder_ffn_dim=2 * d, num_mel_bins=128,
               max_source_positions=1500, max_target_positions=32, vocab_size=64, pad_token_id=0,
               bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, scale_embedding=False)
    model = WhisperForConditionalGeneration(WhisperConfig(**cfg))
    state = {k: v for k, v in _randomize(model, gen).items() if k != "proj_out.weight"}  # tied to embed_tokens
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "chunk_length": 30, "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128,
        "hop_length": 160, "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000, "padding_side": "right",
        "padding_value": 0.0, "processor_class": "WhisperProcessor", "return_attention_mask": False,
        "sampling_rate": 16000}, indent=2))
    save_file(state, str(directory / "model.safetensors"))
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.encoder.")}


def make_tiny_checkpoint(directory: str | Path, seed: int = 0, shards: int = 1) -> Path:
    """Write a tiny HumanOmni / R1-Omni checkpoint (and its tower / BERT directories) into `directory`.

    shards > 1 splits model.safetensors into model-0000k-of-0000n.safetensors with an index, as large
    checkpoints are saved. Returns the checkpoint directory."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    n_tokens = write_qwen_tokenizer(root)
    vocab_size = -(-n_tokens // 64) * 64  # padded like Qwen's 151936 > 151665
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>")}

    bert_cfg, bert_state = _write_bert(root / "bert-base-uncased", gen)
    vision_state = _write_siglip(root / "siglip-base-patch16-224", gen)
    encoder_state = _write_whisper(root / "whisper-large-v3", gen)

    h = TINY["hidden"]
    llm_cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=h, intermediate_size=TINY["intermediate"],
                          num_hidden_layers=TINY["layers"], num_attention_heads=TINY["heads"],
                          num_key_value_heads=TINY["kv_heads"], max_position_embeddings=32768, rope_theta=1e6,
                          rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=ids["<|endoftext|>"],
                          eos_token_id=ids["<|im_end|>"])
    llm = _randomize(Qwen2ForCausalLM(llm_cfg), gen, std=0.15)
    state = {k: v for k, v in llm.items() if k != "lm_head.weight"}  # tied: not stored
    wh, sh = TINY["whisper_hidden"], TINY["siglip_hidden"]
    state.update({f"model.vision_tower.vision_tower.{k}": v for k, v in vision_state.items()})
    state.update({f"model.audio_tower.audio_tower.{k}": v for k, v in encoder_state.items()})
    state.update({"model.audio_tower.audio_tower.projector.weight": _randn(gen, 256, wh),
                  "model.audio_tower.audio_tower.projector.bias": _randn(gen, 256),
                  "model.audio_tower.audio_tower.classifier.weight": _randn(gen, 2, 256),
                  "model.audio_tower.audio_tower.classifier.bias": _randn(gen, 2)})
    state.update({f"model.bert_model.{k}": v for k, v in bert_state.items()})
    state.update({"model.bert_gate.0.weight": _randn(gen, 3584, TINY["bert_hidden"], std=0.2),
                  "model.bert_gate.0.bias": _randn(gen, 3584),
                  "model.bert_gate.2.weight": _randn(gen, 3, 3584, std=0.05), "model.bert_gate.2.bias": _randn(gen, 3)})
    state.update({f"model.mm_projector.{k}": v for k, v in _projector_tensors(sh, h, gen).items()})
    state.update({"model.audio_projector.0.weight": _randn(gen, h, wh, std=0.2),
                  "model.audio_projector.0.bias": _randn(gen, h),
                  "model.audio_projector.2.weight": _randn(gen, h, h, std=0.2),
                  "model.audio_projector.2.bias": _randn(gen, h)})
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}
    from omni_fast.model.checkpoint import write_safetensors
    write_safetensors(state, root, shards)

    config = {
        "_name_or_path": "omni_fast/tiny-R1-Omni", "architectures": ["HumanOmniQwen2ForCausalLM"],
        "attention_dropout": 0.0, "audio_hidden_size": wh, "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"], "freeze_mm_mlp_adapter": False, "hidden_act": "silu", "hidden_size": h,
        "hyper_layers": [15, 22], "image_aspect_ratio": "pad", "initializer_range": 0.02,
        "intermediate_size": TINY["intermediate"], "max_position_embeddings": 32768, "max_window_layers": 21,
        "mm_audio_projector_type": "mlp2x_gelu", "mm_audio_tower": str((root / "whisper-large-v3").resolve()),
        "mm_hidden_size": sh, "mm_projector_lr": None, "mm_projector_type": "all_in_one_small",
        "mm_tunable_parts": "mm_mlp_adapter,audio_projector,mm_language_model", "mm_use_x_start_end": True,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": str((root / "siglip-base-patch16-224").resolve()), "model_type": "HumanOmni_qwen2",
        "num_attention_heads": TINY["heads"], "num_frames": 8, "num_hidden_layers": TINY["layers"],
        "num_key_value_heads": TINY["kv_heads"], "rms_norm_eps": 1e-6, "rope_scaling": None,
        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": True,
        "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "torch_dtype": "bfloat16",
        "transformers_version": "4.49.0", "tune_mm_mlp_adapter": False, "use_cache": True, "use_mm_proj": True,
        "use_sliding_window": False, "vocab_size": vocab_size}
    (root / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (root / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|endoftext|>"], "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"],
        "repetition_penalty": 1.1, "temperature": 0.7, "top_k": 20, "top_p": 0.8,
        "transformers_version": "4.49.0"}, indent=2))
    return root


# --- synthetic clips --------------------------------------------------------------------------------------------
_CONTAINER_AUDIO = {".mp4": "aac", ".mov": "aac", ".mkv": "flac", ".webm": "libopus", ".avi": "pcm_s16le"}
_VIDEO_ENCODERS = {"h264": "libx264", "vp9": "libvpx-vp9", "vp8": "libvpx", "mjpeg": "mjpeg", "hevc": "libx265"}


def clip_frame(index: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Frame `index` of a synthetic clip, (H, W, 3) uint8: a smooth colour field that drifts with time, a moving
    square, and a top band whose grey level encodes the frame index (8 * index mod 256) so tests can tell
    which frames were sampled after lossy coding."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = 0.15 * index + seed
    img = np.stack([128 + 100 * np.sin(x / w * 6.28 + phase), 128 + 100 * np.cos(y / h * 6.28 - phase),
                    128 + 100 * np.sin((x + y) / (w + h) * 6.28 + 2 * phase)], axis=-1)
    s = max(4, min(w, h) // 5)
    cx, cy = int((w - s) * (0.5 + 0.4 * math.sin(0.3 * index))), int((h - s) * (0.5 + 0.4 * math.cos(0.2 * index)))
    img[cy:cy + s, cx:cx + s] = (250, 250, 40)
    img[: max(4, h // 8)] = (8 * index) % 256
    return img.clip(0, 255).astype(np.uint8)


def clip_audio(seconds: float, sample_rate: int, channels: int, seed: int = 0) -> np.ndarray:
    """(channels, samples) float32 in [-1, 1]: a different tone per channel with a slow amplitude swell."""
    t = np.arange(int(round(seconds * sample_rate)), dtype=np.float64) / sample_rate
    tones = [0.3 * np.sin(2 * np.pi * (220 + 110 * c + 10 * seed) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t))
             for c in range(channels)]
    return np.stack(tones).astype(np.float32)


def make_clip(path: str | Path, seconds: float = 2.0, fps: float = 25, size: tuple[int, int] = (160, 120),
              audio: bool = True, codec: str = "h264", sample_rate: int = 44100, channels: int = 2,
              seed: int = 0, frame_fn=None, muxer_options: dict[str, str] | None = None) -> Path:
    """Encode a synthetic clip with PyAV. The container comes from the suffix (.mp4/.mov: h264|hevc + AAC,
    .webm: vp8|vp9 + Opus, .mkv: any + FLAC, .avi: mjpeg + PCM); size is (width, height). frame_fn(index, size)
    -> (H, W, 3) uint8 replaces clip_frame's pattern. muxer_options go to FFmpeg's muxer (e.g.
    {"movflags": "+faststart"}: the mp4 index before the data, so a file cut short can still be opened)."""
    import av

    path = Path(path)
    if codec not in _VIDEO_ENCODERS:
        raise ValueError(f"codec {codec!r}: expected one of {sorted(_VIDEO_ENCODERS)}")
    if path.suffix not in _CONTAINER_AUDIO:
        raise ValueError(f"{path}: container suffix must be one of {sorted(_CONTAINER_AUDIO)}")
    w, h = size
    n_frames = max(1, int(round(seconds * fps)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", options=muxer_options or {}) as container:
        video = container.add_stream(_VIDEO_ENCODERS[codec], rate=Fraction(fps).limit_denominator(1001))
        video.width, video.height = w, h
        video.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec == "h264":
            video.options = {"preset": "veryfast", "crf": "18"}
        astream = None
        if audio:
            acodec = _CONTAINER_AUDIO[path.suffix]
            rate = 48000 if acodec == "libopus" else sample_rate
            astream = container.add_stream(acodec, rate=rate, layout="stereo" if channels == 2 else "mono")
        for i in range(n_frames):
            image = clip_frame(i, size, seed) if frame_fn is None else frame_fn(i, size)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if astream is not None:
            _encode_audio(container, astream, clip_audio(seconds, astream.rate, channels, seed))
    return path


def _encode_audio(container, stream, samples: np.ndarray) -> None:
    import av

    layout = "stereo" if samples.shape[0] == 2 else "mono"
    fmt = stream.codec_context.format.name if stream.codec_context.format else "fltp"
    chunk = stream.codec_context.frame_size or 1024
    for start in range(0, samples.shape[1], chunk):
        block = samples[:, start:start + chunk]
        if fmt == "s16":
            frame = av.AudioFrame.from_ndarray((block.T.reshape(1, -1) * 32767).astype(np.int16), format="s16",
                                               layout=layout)
        elif fmt == "s16p":
            frame = av.AudioFrame.from_ndarray((block * 32767).astype(np.int16), format="s16p", layout=layout)
        elif fmt == "flt":
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block.T.reshape(1, -1)), format="flt",
                                               layout=layout)
        else:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format="fltp", layout=layout)
        frame.sample_rate, frame.pts = stream.rate, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def make_wav(path: str | Path, seconds: float = 2.0, sample_rate: int = 44100, channels: int = 2,
             seed: int = 0) -> Path:
    """A 16-bit PCM wav file of the same tones as make_clip's audio track."""
    import wave

    path = Path(path)
    samples = (clip_audio(seconds, sample_rate, channels, seed).T * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(samples.tobytes())
    return path


def random_r1omni(tiny_checkpoint: str | Path, device: str | torch.device, dtype: torch.dtype, seed: int = 0,
                  num_hidden_layers: int | None = None, tiny_towers: bool = False):
    """A LoadedCheckpoint of the real R1-Omni-0.5B shape with random weights, built in memory: the Qwen2.5-0.5B
    decoder, SigLIP-base-patch16-224, the Whisper-large-v3 encoder, bert-base and the real projector widths,
    with the tokenizers and generation defaults of a tiny checkpoint (their ids are valid in the real
    vocabulary). For benchmarks of the real sizes where no weights can be downloaded. A reduced shape for the
    CPU: num_hidden_layers of the decoder's 24, and tiny_towers (the tiny checkpoint's towers and BERT, the
    projectors' input widths theirs)."""
    import dataclasses

    from transformers import BertConfig, SiglipVisionConfig, WhisperConfig

    from omni_fast.model.checkpoint import load_checkpoint
    from omni_fast.model.omni import HumanOmniForCausalLM, TowerConfigs
    from omni_fast.model.towers import SIGLIP_BASE_PATCH16_224, WHISPER_LARGE_V3

    tiny = load_checkpoint(tiny_checkpoint, device="cpu", dtype=torch.float32)
    shape = {k: v for k, v in QWEN25_05B.items()}
    shape["num_hidden_layers"] = num_hidden_layers or shape["num_hidden_layers"]
    if tiny_towers:
        shape["mm_hidden_size"] = tiny.config.mm_hidden_size
        towers = tiny.towers
    else:
        towers = TowerConfigs(vision=SiglipVisionConfig(**SIGLIP_BASE_PATCH16_224),
                              audio=WhisperConfig(**WHISPER_LARGE_V3), bert=BertConfig())
    cfg = dataclasses.replace(tiny.config, **shape, audio_hidden_size=towers.audio.d_model,
                              torch_dtype=str(dtype).removeprefix("torch."))
    torch.manual_seed(seed)
    with torch.device(device):
        model = HumanOmniForCausalLM(cfg, towers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".bn.weight" in name:
                p.fill_(1.0)
            elif p.dim() > 1:
                p.normal_(0, 0.1 if "embed_tokens" in name else 0.02)
    model = model.to(dtype).eval()
    model.model.vision_tower.requires_grad_(False)
    model.model.audio_tower.requires_grad_(False)
    return dataclasses.replace(tiny, model=model, config=cfg, towers=towers)
