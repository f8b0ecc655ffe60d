"""The lean Qwen2 decoder against transformers' Qwen2ForCausalLM with the same weights (fp32, CPU)."""
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from omni_fast.config import ModelConfig
from omni_fast.model.qwen2 import Qwen2LM


def _pair(tied: bool, heads=4, kv=2, hidden=64, layers=3, vocab=311):
    hf_cfg = Qwen2Config(hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=vocab, rope_theta=1e6, tie_word_embeddings=tied)
    hf = Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():  # away from the init so biases, norms and an untied head all matter
            p.normal_(0, 0.2)
    cfg = ModelConfig(hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, mm_hidden_size=8, tie_word_embeddings=tied)
    ours = Qwen2LM(cfg).eval()
    state = hf.state_dict()
    if tied:
        state.pop("lm_head.weight")
    ours.load_state_dict(state, strict=True)
    return hf, ours


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 37), (3, 123)])
def test_logits_match_transformers(tied, batch, seq):
    hf, ours = _pair(tied)
    embeds = torch.randn(batch, seq, 64)
    with torch.no_grad():
        ref = hf(inputs_embeds=embeds).logits
        out = ours(embeds)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 1e-4


def test_positions_offset_equal_a_longer_sequence():
    """Feeding positions explicitly (as the engine does) reproduces the full causal pass."""
    _, ours = _pair(True, heads=2, kv=1)
    embeds = torch.randn(1, 20, 64)
    with torch.no_grad():
        full = ours(embeds)
        again = ours(embeds, torch.arange(20)[None])
    assert torch.equal(full, again)


def test_bf16_close_to_fp32():
    hf, ours = _pair(True)
    embeds = torch.randn(2, 16, 64)
    with torch.no_grad():
        ref64 = hf.double()(inputs_embeds=embeds.double()).logits
        torch_bf16 = hf.bfloat16()(inputs_embeds=embeds.bfloat16()).logits.double()
        ours_bf16 = ours.bfloat16()(embeds.bfloat16()).double()
    assert (ours_bf16 - ref64).abs().max() <= 2 * (torch_bf16 - ref64).abs().max() + 1e-6


@pytest.mark.gpu
def test_flash_attn_path_matches_sdpa():
    pytest.importorskip("flash_attn")
    from omni_fast import ops
    from omni_fast.kernels.causal_attention import causal_attention_ref

    q = torch.randn(2, 300, 14, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 2, 300, 2, 64, device="cuda", dtype=torch.bfloat16).unbind(0)
    assert ops.backends("causal_attention", "cuda")[0] == "cuda"
    ref = causal_attention_ref(q.double(), k.double(), v.double())
    torch_err = (causal_attention_ref(q, k, v).double() - ref).abs().max()
    assert (ops.causal_attention(q, k, v).double() - ref).abs().max() <= 2 * torch_err


@pytest.mark.parametrize("tq,tk", [(5, 5), (5, 12), (1, 40)])
def test_causal_attention_with_earlier_keys_is_the_tail_of_the_full_pass(tq, tk):
    """Queries for the last tq of tk positions (a prefill chunk after earlier ones) give the last tq rows of the
    full causal pass: query i sees keys <= i + tk - tq (flash-attn's alignment)."""
    from omni_fast.kernels.causal_attention import causal_attention_ref as sdpa_causal_attention

    q = torch.randn(2, tk, 4, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, tk, 2, 16, dtype=torch.float64).unbind(0)
    full = sdpa_causal_attention(q, k, v)
    assert (sdpa_causal_attention(q[:, tk - tq:], k, v) - full[:, tk - tq:]).abs().max() < 1e-12


@pytest.mark.gpu
def test_flash_attn_aligns_earlier_keys_like_sdpa():
    pytest.importorskip("flash_attn")
    from omni_fast import ops
    from omni_fast.kernels.causal_attention import causal_attention_ref as sdpa_causal_attention

    q = torch.randn(1, 100, 14, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 1, 300, 2, 64, device="cuda", dtype=torch.bfloat16).unbind(0)
    ref = sdpa_causal_attention(q.double(), k.double(), v.double())
    torch_err = (sdpa_causal_attention(q, k, v).double() - ref).abs().max()
    assert (ops.causal_attention(q, k, v).double() - ref).abs().max() <= 2 * torch_err
