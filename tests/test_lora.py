"""LoRA on the HumanOmni model (omni_fast/model/lora.py): the adapter in PEFT's format against transformers'
Qwen2 with peft's own loading, the merged export against the unmerged forward and the reference composition
(tests/reference.py), and the errors that name what does not fit. fp32 on the CPU."""
import json

import pytest
import torch

from omni_fast.api import OmniModel
from omni_fast.cli import main
from omni_fast.media.pyav import load_clip
from omni_fast.model import lora
from omni_fast.model.checkpoint import CheckpointError, load_checkpoint
from omni_fast.task import DEFAULT_INSTRUCT

TOL = 1e-4
SETTINGS = dict(r=4, alpha=8, dropout=0.0)


def _randomise(adapters, seed: int = 0) -> None:
    """Adapters as training leaves them (peft starts B at 0, which would hide any mistake in B's handling)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapters:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _adapted(tiny_ckpt, targets, seed=0):
    loaded = load_checkpoint(tiny_ckpt, device="cpu", dtype=torch.float32)
    adapters = lora.apply(loaded.model, SETTINGS["r"], SETTINGS["alpha"], 0.0, targets)
    _randomise(adapters, seed)
    return loaded


def _save(model, directory, tiny_ckpt, targets):
    directory.mkdir(parents=True, exist_ok=True)
    lora.save_adapter(model, directory, str(tiny_ckpt), {**SETTINGS, "targets": targets})
    return directory


def test_only_the_adapters_train_and_start_at_the_base_model(tiny_ckpt):
    loaded = load_checkpoint(tiny_ckpt, device="cpu", dtype=torch.float32)
    base = load_checkpoint(tiny_ckpt, device="cpu", dtype=torch.float32).model
    adapters = lora.apply(loaded.model, 4, 8, 0.0, lora.TARGETS)
    trained = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trained == [n for n, _ in adapters] and all(lora.is_adapter(n) for n in trained)
    # 2 decoder layers x 4 linears + 6 video projector linears + 2 audio projector linears, A and B each
    assert len(adapters) == 2 * (2 * 4 + 6 + 2)
    assert not any("_tower." in n or "bert" in n for n in trained)
    embeds = torch.randn(1, 7, loaded.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(loaded.model(embeds), base(embeds))  # B = 0: exactly the base model


@pytest.mark.parametrize("r,alpha", [(4, 8), (3, 5)])
def test_an_adapted_linear_adds_alpha_over_r_times_b_a(tiny_ckpt, r, alpha):
    """Each adapted linear computes x W^T + b + (lora_alpha / lora_r) x A^T B^T, written out here in float64 from
    the layer's own tensors (a packed linear and a plain one), and `merge` leaves W + (alpha / r) B A in W."""
    loaded = load_checkpoint(tiny_ckpt, device="cpu", dtype=torch.float32)
    _randomise(lora.apply(loaded.model, r, alpha, 0.0, lora.DECODER_TARGETS))
    attn = loaded.model.model.layers[0].self_attn
    x = torch.randn(5, loaded.config.hidden_size)
    want = {}
    for name in ("qkv_proj", "o_proj"):
        layer = getattr(attn, name)
        base = layer.get_base_layer()
        (a,), (b,) = [m.weight.double() for m in layer.lora_A.values()], \
            [m.weight.double() for m in layer.lora_B.values()]
        assert a.shape[0] == r and b.shape[1] == r
        want[name] = base.weight.double() + alpha / r * (b @ a)
        inp = x[:, :base.in_features]
        expected = inp.double() @ want[name].T + (0 if base.bias is None else base.bias.double())
        with torch.no_grad():
            got = layer(inp).double()
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), name
    lora.merge(loaded.model)
    for name in ("qkv_proj", "o_proj"):
        merged = getattr(attn, name)
        assert type(merged) is torch.nn.Linear
        assert (merged.weight.double() - want[name]).abs().max() <= 1e-6 * want[name].abs().max(), name


def test_the_adapter_loads_onto_transformers_qwen2_with_peft(tiny_ckpt, tmp_path, reference):
    """Saved in PEFT's format with Hugging Face's module names (the packed qkv / gate_up split into q, k, v /
    gate, up sharing A), the adapter loads with PeftModel.from_pretrained on transformers' Qwen2 and gives the
    logits of our adapted decoder."""
    from peft import PeftModel

    loaded = _adapted(tiny_ckpt, lora.DECODER_TARGETS)
    directory = _save(loaded.model, tmp_path / "adapter", tiny_ckpt, lora.DECODER_TARGETS)
    config = json.loads((directory / lora.ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == str(tiny_ckpt)
    hf = PeftModel.from_pretrained(reference.llm, str(directory))
    try:
        embeds = torch.randn(1, 9, loaded.config.hidden_size)
        with torch.no_grad():
            ours = loaded.model(embeds)
            theirs = hf(inputs_embeds=embeds).logits
        assert (ours - theirs).abs().max() < TOL
        with torch.no_grad(), hf.disable_adapter():
            base = hf(inputs_embeds=embeds).logits
        assert (ours - base).abs().max() > 100 * TOL  # the adapter matters: the check can tell
    finally:
        hf.unload()  # the session's reference model without the adapter again


def test_save_and_load_round_trip_and_mismatches_are_named(tiny_ckpt, tmp_path):
    loaded = _adapted(tiny_ckpt, lora.TARGETS)
    directory = _save(loaded.model, tmp_path / "a", tiny_ckpt, lora.TARGETS)
    settings = lora.read_settings(directory)
    assert settings == {**SETTINGS, "targets": lora.TARGETS, "base_model": str(tiny_ckpt)}
    again = load_checkpoint(tiny_ckpt, device="cpu", dtype=torch.float32)
    lora.apply(again.model, 4, 8, 0.0, lora.TARGETS)
    lora.load_adapter(again.model, directory)
    want = dict(loaded.model.named_parameters())
    assert all(torch.equal(p, want[n]) for n, p in again.model.named_parameters())
    other = load_checkpoint(tiny_ckpt, device="cpu", dtype=torch.float32)
    lora.apply(other.model, 8, 8, 0.0, lora.TARGETS)
    with pytest.raises(lora.LoraError, match="another lora_r"):
        lora.load_adapter(other.model, directory)
    fewer = load_checkpoint(tiny_ckpt, device="cpu", dtype=torch.float32)
    lora.apply(fewer.model, 4, 8, 0.0, lora.DECODER_TARGETS)
    with pytest.raises(lora.LoraError, match="does not fit this model's adapters"):
        lora.load_adapter(fewer.model, directory)
    from safetensors.torch import load_file, save_file

    state = load_file(str(directory / lora.ADAPTER_WEIGHTS))
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    state[key] = state[key] + 1.0
    save_file(state, str(directory / lora.ADAPTER_WEIGHTS))
    with pytest.raises(lora.LoraError, match="q_proj, k_proj, v_proj of model.layers.0.self_attn have different "
                                             "lora_A"):
        lora.load_adapter(again.model, directory)


@pytest.mark.parametrize("targets,needle", [(("q_proj", "v_proj"), r"\['q_proj', 'v_proj'\] but not \['k_proj'\]"),
                                            (("gate_proj", "down_proj"), "not \\['up_proj'\\]"),
                                            (("q_proj", "k_proj", "v_proj", "lm_head"), "lm_head"), ((), "none")])
def test_targets_that_cannot_be_adapted_are_named(targets, needle):
    with pytest.raises(lora.LoraError, match=needle):
        lora.check_targets(targets)


def _with_weights_of(source, weights, directory):
    """A copy of the checkpoint `source` whose weight files are those of `weights` (the reference composition
    reads its tower configs in the original checkpoints' layout)."""
    import shutil

    shutil.copytree(source, directory)
    for f in list(directory.glob("model*.safetensors*")):
        f.unlink()
    for f in weights.glob("model*.safetensors*"):
        shutil.copy2(f, directory / f.name)
    return directory


@pytest.mark.slow  # about 40 s: three models loaded, the reference composed
def test_merged_export_equals_the_unmerged_forward_and_the_reference_composition(tiny_ckpt, tmp_path, clips,
                                                                                  capsys):
    """`omni-fast export --merge` on a LoRA training checkpoint (adapters on the decoder and both projectors):
    OmniModel.from_pretrained on the export, the model composed from transformers' classes on it
    (tests/reference.py) and the unmerged adapted model give the same logits."""
    from reference import ReferenceOmni

    unmerged = OmniModel.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)
    _randomise(lora.apply(unmerged.model, SETTINGS["r"], SETTINGS["alpha"], 0.0, lora.TARGETS), seed=1)
    checkpoint = _save(unmerged.model, tmp_path / "run" / "checkpoint-3", tiny_ckpt, lora.TARGETS)
    (checkpoint / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="export --merge"):
        OmniModel.from_pretrained(checkpoint, device="cpu")
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "plain")]) == 2
    assert "pass --merge" in capsys.readouterr().err
    assert main(["export", "--merge", str(checkpoint), "--out", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    assert main(["export", "--merge", str(tmp_path / "merged"), "--out", str(tmp_path / "again")]) == 2
    assert "needs a LoRA checkpoint" in capsys.readouterr().err

    clip = load_clip(clips["mp4"], aspect="stretch")
    merged = OmniModel.from_pretrained(tmp_path / "merged", device="cpu", dtype=torch.float32)
    ids = merged.prompt_ids(DEFAULT_INSTRUCT, "video_audio")
    args = (torch.tensor([ids]), clip.frames, clip.mel, DEFAULT_INSTRUCT)
    want = unmerged.forward_logits(*args)
    ours = merged.forward_logits(*args)
    ref = ReferenceOmni(_with_weights_of(tiny_ckpt, tmp_path / "merged", tmp_path / "ref"), tiny_ckpt / "bert-base-uncased")
    bert = dict(merged.bert_tokenizer([DEFAULT_INSTRUCT], return_tensors="pt", padding=True, truncation=True))
    theirs = ref.logits(ref.embeddings(ids, clip.frames, clip.mel, bert))
    assert (ours - want).abs().max() < TOL and (theirs - want).abs().max() < TOL
    base = OmniModel.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32).forward_logits(*args)
    assert (base - want).abs().max() > 100 * TOL  # the merge changed the weights: the check can tell
