"""Checkpoint directories: where each part is read from, every bad input, and save -> load round trips."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from omni_fast.model import checkpoint
from omni_fast.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from omni_fast.testing import make_tiny_checkpoint


@pytest.fixture
def ckpt(tiny_ckpt, tmp_path):
    """A private copy of the tiny checkpoint (its config still points at the shared tower directories)."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, dst)
    return dst


def _load(path, **kw):
    return load_checkpoint(path, device="cpu", dtype=torch.float32, **kw)


def _rewrite(path, fn):
    state = load_file(str(path / "model.safetensors"))
    save_file(fn(state), str(path / "model.safetensors"))


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_loads_every_tensor_from_the_file(tiny_ckpt):
    loaded = _load(tiny_ckpt)
    stored = load_file(str(tiny_ckpt / "model.safetensors"))
    ours = loaded.model.state_dict()
    assert set(ours) == set(stored)  # lm_head is tied, not stored
    for name, t in stored.items():
        assert torch.equal(ours[name], t.float()), name
    assert loaded.model.lm_head_weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()
    assert not any(p.requires_grad for p in loaded.model.model.vision_tower.parameters())
    assert not any(t.is_meta for t in loaded.model.state_dict().values())
    assert all(not b.is_meta for b in loaded.model.buffers())


def test_bert_weights_come_from_the_checkpoint_not_the_bert_directory(tiny_ckpt):
    loaded = _load(tiny_ckpt)
    stock = load_file(str(tiny_ckpt / "bert-base-uncased" / "model.safetensors"))
    ours = loaded.model.model.bert_model.state_dict()
    name = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(ours[name], stock[name].float())
    assert loaded.bert_dir == tiny_ckpt / "bert-base-uncased"


def test_sharded_checkpoint_loads_the_same_tensors(tmp_path, tiny_ckpt):
    sharded = make_tiny_checkpoint(tmp_path / "sharded", seed=0, shards=3)
    assert len(list(sharded.glob("model-0000*-of-00003.safetensors"))) == 3
    a, b = _load(tiny_ckpt).model.state_dict(), _load(sharded).model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_tower_weights_from_the_tower_directories_when_the_checkpoint_has_none(ckpt, tiny_ckpt, caplog):
    _rewrite(ckpt, lambda s: {k: v for k, v in s.items() if not k.startswith(("model.vision_tower.", "model.audio_tower."))})
    with caplog.at_level("DEBUG", logger="omni_fast.model.checkpoint"):
        loaded = _load(ckpt)
    ours = loaded.model.state_dict()
    siglip = load_file(str(tiny_ckpt / "siglip-base-patch16-224" / "model.safetensors"))
    whisper = load_file(str(tiny_ckpt / "whisper-large-v3" / "model.safetensors"))
    for k, v in siglip.items():
        if k.startswith("vision_model."):
            assert torch.equal(ours["model.vision_tower.vision_tower." + k], v), k
    for k, v in whisper.items():
        if k.startswith("model.encoder."):
            assert torch.equal(ours["model.audio_tower.audio_tower." + k[len("model."):]], v), k
    assert "vision tower weights: " + str(tiny_ckpt / "siglip") in caplog.text


def test_tower_directory_absent_with_weights_in_checkpoint_uses_the_known_config(ckpt, monkeypatch):
    """R1-Omni checkpoints carry the tower weights: a missing mm_vision_tower directory is then not fatal."""
    vision = json.loads((ckpt / "siglip-base-patch16-224" / "config.json").read_text())["vision_config"]
    monkeypatch.setattr(checkpoint, "SIGLIP_BASE_PATCH16_224", {k: v for k, v in vision.items() if k != "model_type"})
    shutil.rmtree(ckpt / "siglip-base-patch16-224")  # else found by its name inside the checkpoint
    _edit_config(ckpt, mm_vision_tower="/nonexistent/siglip-base-patch16-224")
    loaded = _load(ckpt)
    assert loaded.model.towers.vision.hidden_size == vision["hidden_size"]


def test_tower_directory_absent_and_no_weights_is_a_clear_error(ckpt):
    shutil.rmtree(ckpt / "whisper-large-v3")
    _edit_config(ckpt, mm_audio_tower="/nonexistent/whisper-large-v3")
    _rewrite(ckpt, lambda s: {k: v for k, v in s.items() if not k.startswith("model.audio_tower.")})
    with pytest.raises(CheckpointError, match=r"/nonexistent/whisper-large-v3.*--audio_tower"):
        _load(ckpt)


def test_tower_override_must_exist(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        _load(ckpt, vision_tower=tmp_path / "no_such_dir")


def test_tower_directory_absent_whose_stock_config_does_not_fit_is_named(ckpt):
    """The stock siglip-base config stands in for a missing tower directory; when it does not fit the tower
    weights the checkpoint holds, the error names the directory config.json gave and the way out."""
    shutil.rmtree(ckpt / "siglip-base-patch16-224")
    _edit_config(ckpt, mm_vision_tower="/gone/siglip-base-patch16-224")
    with pytest.raises(CheckpointError, match=r"mm_vision_tower directory '/gone/siglip-base-patch16-224' does not "
                                              r"exist.*--vision_tower"):
        _load(ckpt)


def test_relative_tower_path_resolves_against_the_checkpoint(ckpt, caplog):
    _edit_config(ckpt, mm_vision_tower="siglip-base-patch16-224", mm_audio_tower="whisper-large-v3")
    _rewrite(ckpt, lambda s: {k: v for k, v in s.items() if not k.startswith("model.vision_tower.")})
    # this copy's SigLIP weights differ from the shared tiny checkpoint's: they can only come from ckpt/siglip...
    siglip_file = ckpt / "siglip-base-patch16-224" / "model.safetensors"
    siglip = {k: v + 0.5 if v.is_floating_point() else v for k, v in load_file(str(siglip_file)).items()}
    save_file(siglip, str(siglip_file))
    with caplog.at_level("DEBUG", logger="omni_fast.model.checkpoint"):
        loaded = _load(ckpt)
    ours = loaded.model.state_dict()
    vision = {k: v for k, v in siglip.items() if k.startswith("vision_model.")}
    assert vision
    for k, v in vision.items():
        assert torch.equal(ours["model.vision_tower.vision_tower." + k], v.float()), k
    assert f"vision tower weights: {ckpt / 'siglip-base-patch16-224'}" in caplog.text
    stored = load_file(str(ckpt / "model.safetensors"))                  # the rest still from the checkpoint
    for k in ("model.embed_tokens.weight", "model.audio_tower.audio_tower.encoder.conv1.weight"):
        assert torch.equal(ours[k], stored[k].float()), k


def test_missing_bert_directory_names_where_it_looked(ckpt, tmp_path, monkeypatch):
    shutil.rmtree(ckpt / "bert-base-uncased")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"bert-base-uncased.*--bert_path"):
        _load(ckpt)
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        _load(ckpt, bert_path=tmp_path / "elsewhere")


def test_missing_and_unexpected_tensors_are_listed(ckpt):
    def edit(state):
        state.pop("model.layers.1.mlp.up_proj.weight")
        state["model.extra_head.weight"] = torch.zeros(2, 2)
        return state
    _rewrite(ckpt, edit)
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight.*"
                                              r"unexpected tensors: model\.extra_head\.weight"):
        _load(ckpt)


def test_shape_mismatch_is_reported(ckpt):
    _edit_config(ckpt, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"shapes.*mlp\.(gate|up|down)_proj\.weight"):
        _load(ckpt)


@pytest.mark.parametrize("content,match", [("{not json", "not valid JSON"),
                                            ('{"model_type": "llama"}', "missing required key"),
                                            (None, "model_type 'llava'")])
def test_bad_config(ckpt, content, match):
    if content is None:
        _edit_config(ckpt, model_type="llava")
    else:
        (ckpt / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=match) as err:
        _load(ckpt)
    assert "config.json" in str(err.value)


def test_no_weights_and_corrupt_weights(ckpt, tmp_path):
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        _load(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        _load(ckpt)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        _load(tmp_path / "nowhere")


def test_index_naming_a_missing_shard(tmp_path):
    root = make_tiny_checkpoint(tmp_path / "s", shards=2)
    (root / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        _load(root)


def test_save_round_trip(tiny_ckpt, tmp_path):
    loaded = _load(tiny_ckpt)
    with torch.no_grad():  # as after training: the saved values must be the new ones
        loaded.model.model.bert_gate[2].bias.add_(0.5)
    out = save_checkpoint(loaded, tmp_path / "saved", shards=2)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
            "merges.txt", "generation_config.json"} <= names
    saved, source = json.loads((out / "config.json").read_text()), json.loads((tiny_ckpt / "config.json").read_text())
    towers = {"mm_vision_tower": str(out.resolve() / "siglip-base-patch16-224"),
              "mm_audio_tower": str(out.resolve() / "whisper-large-v3")}
    assert saved == {**source, **towers}  # the towers are the checkpoint's own folders now
    with safe_open(str(out / "model-00001-of-00002.safetensors"), framework="pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16  # the config's torch_dtype
    again = _load(out).model.state_dict()
    before = loaded.model.state_dict()
    assert set(again) == set(before)
    assert all(torch.equal(again[k], before[k].bfloat16().float()) for k in before)
    assert not list(tmp_path.glob(".saved.*"))


def test_save_never_clobbers_or_half_writes(tiny_ckpt, tmp_path, monkeypatch):
    loaded = _load(tiny_ckpt)
    out = save_checkpoint(loaded, tmp_path / "saved")
    snapshot = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(FileExistsError):
        save_checkpoint(loaded, out)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(loaded, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == snapshot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_permission_denied_is_said(ckpt, monkeypatch):
    """A weight or config file that exists but cannot be read (root ignores file modes, so the OS error is
    simulated where the file is opened)."""
    def denied(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(checkpoint, "safe_open", denied)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: permission denied"):
        _load(ckpt)
    monkeypatch.undo()
    real = type(ckpt).read_text
    monkeypatch.setattr(type(ckpt), "read_text", lambda self, *a, **k: denied(self) if self.name == "config.json"
                        else real(self, *a, **k))
    with pytest.raises(CheckpointError, match=r"config\.json: permission denied"):
        _load(ckpt)


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root reads files whatever their mode")
def test_permission_denied_on_a_real_file(ckpt):
    (ckpt / "model.safetensors").chmod(0)
    try:
        with pytest.raises(CheckpointError, match="permission denied"):
            _load(ckpt)
    finally:
        (ckpt / "model.safetensors").chmod(0o644)


def test_stop_ids_are_the_generation_config_eos_plus_the_tokenizer_eos(ckpt, tiny_ckpt):
    tok_eos = _load(tiny_ckpt).tokenizer.eos_token_id
    gen = json.loads((ckpt / "generation_config.json").read_text())
    other = [t for t in gen["eos_token_id"] if t != tok_eos]
    gen["eos_token_id"] = other  # the tokenizer's EOS (<|im_end|>) no longer in the generation config
    (ckpt / "generation_config.json").write_text(json.dumps(gen))
    loaded = _load(ckpt)
    assert loaded.generation.eos_token_ids == (*other, tok_eos)
    assert loaded.generation.repetition_penalty == gen["repetition_penalty"]
    assert loaded.generation.config.eos_token_id == other  # read through transformers' GenerationConfig
    (ckpt / "generation_config.json").unlink()
    assert _load(ckpt).generation.eos_token_ids == (json.loads((ckpt / "config.json").read_text())["eos_token_id"],)


def test_saved_checkpoint_does_not_need_the_source_tower_directories(tiny_ckpt, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt, src)
    _edit_config(src, mm_vision_tower=str(src / "siglip-base-patch16-224"),
                 mm_audio_tower=str(src / "whisper-large-v3"))
    loaded = _load(src)
    out = save_checkpoint(loaded, tmp_path / "saved")
    shutil.rmtree(src)
    again = _load(out)
    before = loaded.model.state_dict()
    assert all(torch.equal(again.model.state_dict()[k], before[k].bfloat16().float()) for k in before)
    assert again.model.towers.vision.hidden_size == loaded.model.towers.vision.hidden_size
    assert json.loads((out / "config.json").read_text())["mm_vision_tower"] == str(out / "siglip-base-patch16-224")
    moved = tmp_path / "moved"  # a moved checkpoint finds its tower folders by name
    out.rename(moved)
    assert _load(moved).model.towers.audio.d_model == loaded.model.towers.audio.d_model


def test_a_model_assembled_in_memory_saves_its_own_tower_and_bert_configs(tiny_ckpt, tmp_path):
    """A model built in memory with towers and a BERT of other sizes than the checkpoint its tokenizers came
    from (as testing.random_r1omni builds the real shape): the saved checkpoint describes that model, not the
    source's directories, and loads back with every tensor."""
    import dataclasses

    from transformers import BertConfig, SiglipVisionConfig, WhisperConfig

    from omni_fast.model.omni import HumanOmniForCausalLM, TowerConfigs

    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt, src)
    _edit_config(src, mm_vision_tower=str(src / "siglip-base-patch16-224"),
                 mm_audio_tower=str(src / "whisper-large-v3"))
    tiny = _load(src)
    vision = SiglipVisionConfig(**{**tiny.model.towers.vision.to_dict(), "hidden_size": 48, "intermediate_size": 96,
                                   "num_attention_heads": 4})
    audio = WhisperConfig(**{**tiny.model.towers.audio.to_dict(), "d_model": 40, "encoder_attention_heads": 4,
                             "encoder_ffn_dim": 80, "encoder_layers": 1})
    bert = BertConfig(**{**tiny.model.towers.bert.to_dict(), "hidden_size": 24, "num_attention_heads": 2,
                         "intermediate_size": 48, "num_hidden_layers": 1})
    cfg = dataclasses.replace(tiny.config, mm_hidden_size=48, audio_hidden_size=40, torch_dtype="float32")
    torch.manual_seed(3)
    model = HumanOmniForCausalLM(cfg, TowerConfigs(vision=vision, audio=audio, bert=bert)).eval()
    assembled = dataclasses.replace(tiny, model=model, config=cfg)  # .towers still holds the tiny source's
    out = save_checkpoint(assembled, tmp_path / "saved")
    shutil.rmtree(src)  # nothing of the source is needed any more
    saved = json.loads((out / "config.json").read_text())
    assert (saved["mm_vision_tower"], saved["mm_audio_tower"]) == (str(out.resolve() / "siglip-base-patch16-224"),
                                                                   str(out.resolve() / "whisper-large-v3"))
    assert json.loads((out / "siglip-base-patch16-224" / "config.json").read_text())["hidden_size"] == 48
    assert json.loads((out / "whisper-large-v3" / "config.json").read_text())["d_model"] == 40
    assert json.loads((out / "bert-base-uncased" / "config.json").read_text())["hidden_size"] == 24
    again = _load(out)
    assert (again.model.towers.vision.hidden_size, again.model.towers.audio.d_model,
            again.model.towers.bert.hidden_size, again.model.towers.audio.encoder_layers) == (48, 40, 24, 1)
    before, after = model.state_dict(), again.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_overwrite_replaces_only_a_checkpoint_and_cleans_leftovers(tiny_ckpt, tmp_path):
    loaded = _load(tiny_ckpt)
    mine = tmp_path / "my-files"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a checkpoint"):
        save_checkpoint(loaded, mine, overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    out = save_checkpoint(loaded, tmp_path / "saved")
    (tmp_path / ".saved.tmp-99999").mkdir()  # what a killed save leaves
    (tmp_path / ".saved.old-99999").mkdir()
    (out / "stale.txt").write_text("from the old copy")
    save_checkpoint(loaded, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-files", "saved"]
    assert not (out / "stale.txt").exists() and checkpoint.is_checkpoint(out)


def test_sharded_by_bytes(tiny_ckpt, tmp_path):
    loaded = _load(tiny_ckpt)
    limit = 400_000
    out = save_checkpoint(loaded, tmp_path / "saved", max_shard_size=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    sizes = {}
    for name, fname in index["weight_map"].items():
        with safe_open(str(out / fname), framework="pt") as f:
            t = f.get_tensor(name)
        sizes.setdefault(fname, []).append(t.numel() * t.element_size())
    assert index["metadata"]["total_size"] == sum(map(sum, sizes.values()))
    assert all(sum(s) <= limit or len(s) == 1 for s in sizes.values())  # a larger tensor has a shard of its own
    again, before = _load(out).model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(again[k], before[k].bfloat16().float()) for k in before)
    single = save_checkpoint(loaded, tmp_path / "single")  # 5GB default: one file, no index
    assert (single / "model.safetensors").is_file() and not (single / "model.safetensors.index.json").exists()


def test_shard_count_split_balances_bytes():
    state = {f"t{i}": torch.zeros(n) for i, n in enumerate([10, 10, 10, 10, 40, 10, 10])}
    plan = checkpoint.shard_plan(state, shards=3)
    assert len(plan) == 3 and sorted(sum(plan, [])) == sorted(state)
    assert [sum(state[k].numel() for k in part) for part in plan] == [30, 50, 20]  # by bytes, not 3-3-1 tensors
    assert [len(part) for part in checkpoint.shard_plan(state, shards=2)] == [4, 3]


# --- an interrupted replace keeps a copy -------------------------------------------------------------------------
def _fail_renames(monkeypatch, calls, error):
    """Path.rename raises `error` on the given calls (1-based); the others rename."""
    real, seen = Path.rename, []

    def rename(self, target):
        seen.append((self, target))
        if len(seen) in calls:
            raise error
        return real(self, target)
    monkeypatch.setattr(Path, "rename", rename)
    return seen


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError("disk gone")])
def test_move_into_place_puts_the_old_copy_back_when_the_second_rename_fails(tmp_path, monkeypatch, error):
    target, tmp = tmp_path / "ckpt", tmp_path / ".ckpt.tmp-1"
    for d, text in ((target, "old"), (tmp, "new")):
        d.mkdir()
        (d / "f").write_text(text)
    _fail_renames(monkeypatch, {2}, error)
    with pytest.raises(type(error)):
        checkpoint.move_into_place(tmp, target)
    assert (target / "f").read_text() == "old" and (tmp / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.tmp-1", "ckpt"]


def test_interrupted_overwrite_keeps_the_old_checkpoint(tiny_ckpt, tmp_path, monkeypatch):
    """Ctrl-C between moving the old copy aside and renaming the new one in: the old copy is put back."""
    loaded = _load(tiny_ckpt)
    out = save_checkpoint(loaded, tmp_path / "saved")
    before = _snapshot(out)
    _fail_renames(monkeypatch, {2}, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(loaded, out, overwrite=True)
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_a_copy_moved_aside_and_stranded_is_restored_by_the_next_save(tiny_ckpt, tmp_path, monkeypatch):
    """Neither the new copy's rename nor the old copy's return goes through (as after a kill between them):
    the new copy is kept too, and the next save puts the old one back instead of deleting it."""
    loaded = _load(tiny_ckpt)
    out = save_checkpoint(loaded, tmp_path / "saved")
    before = _snapshot(out)
    _fail_renames(monkeypatch, {2, 3}, OSError("I/O error"))
    with pytest.raises(OSError, match="I/O error"):
        save_checkpoint(loaded, out, overwrite=True)
    monkeypatch.undo()
    assert not out.exists()
    aside, = tmp_path.glob(".saved.old-*")
    kept, = tmp_path.glob(".saved.tmp-*")
    assert _snapshot(aside) == before and checkpoint.is_checkpoint(kept)
    with pytest.raises(FileExistsError):  # the restored checkpoint is not replaced without overwrite=True
        save_checkpoint(loaded, out)
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_clean_leftovers_removes_a_copy_aside_only_beside_a_complete_checkpoint(tiny_ckpt, tmp_path):
    out = save_checkpoint(_load(tiny_ckpt), tmp_path / "saved")
    shutil.copytree(out, tmp_path / ".saved.old-7")
    checkpoint.clean_leftovers(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]
    out.rename(tmp_path / ".saved.old-8")
    checkpoint.clean_leftovers(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"] and checkpoint.is_checkpoint(out)


def test_clean_partial_restores_a_training_checkpoint_moved_aside(tmp_path):
    from omni_fast.grpo import checkpoints

    def checkpoint_dir(name, text):
        (tmp_path / name).mkdir()
        (tmp_path / name / checkpoints.STATE_FILE).write_text(text)
    checkpoint_dir(".checkpoint-5.old-123", "step 5")  # checkpoint-5 was moved aside, its successor never came
    checkpoint_dir("checkpoint-7", "new 7")
    checkpoint_dir(".checkpoint-7.old-123", "old 7")  # the save of checkpoint-7 finished: the old copy goes
    checkpoint_dir(".checkpoint-9.partial-123", "partial")
    checkpoint_dir("..checkpoint-9.partial-123.old-123", "inner")
    checkpoints.clean_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5", "checkpoint-7"]
    assert (tmp_path / "checkpoint-5" / checkpoints.STATE_FILE).read_text() == "step 5"
    assert (tmp_path / "checkpoint-7" / checkpoints.STATE_FILE).read_text() == "new 7"


# --- weights that went through float16 ---------------------------------------------------------------------------
def test_saving_float16_weights_as_bfloat16_warns(tiny_ckpt, tmp_path, caplog):
    loaded = load_checkpoint(tiny_ckpt, device="cpu", dtype=torch.float16)
    with caplog.at_level("WARNING", logger="omni_fast.model.checkpoint"):
        out = save_checkpoint(loaded, tmp_path / "saved")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "float16" in warned[0] and "bfloat16" in warned[0]
    assert "--dtype bfloat16" in warned[0] and "dtype=torch.bfloat16" in warned[0]
    assert checkpoint.is_checkpoint(out)
    caplog.clear()
    with caplog.at_level("WARNING", logger="omni_fast.model.checkpoint"):
        save_checkpoint(_load(tiny_ckpt), tmp_path / "from-fp32")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_saving_infinities_that_float16_loading_made_is_refused(ckpt, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"
    _rewrite(ckpt, lambda s: {**s, name: s[name].index_fill(1, torch.tensor([0]), 1e5)})  # > float16's 65504
    loaded = load_checkpoint(ckpt, device="cpu", dtype=torch.float16)
    with pytest.raises(CheckpointError, match=rf"{name}.*inf.*--dtype bfloat16"):
        save_checkpoint(loaded, tmp_path / "saved")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing written


def test_saving_a_cast_that_overflows_is_refused(ckpt, tmp_path):
    _edit_config(ckpt, torch_dtype="float16")
    loaded = _load(ckpt)
    name = "model.layers.0.mlp.down_proj.weight"
    with torch.no_grad():
        loaded.model.model.layers[0].mlp.down_proj.weight[0, 0] = 1e6
    with pytest.raises(CheckpointError, match=rf"{name}.*inf"):
        save_checkpoint(loaded, tmp_path / "saved")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# --- tower configs found where save_checkpoint puts them ---------------------------------------------------------
@pytest.mark.parametrize("configured", ["towers/siglip-base-patch16-224", "../elsewhere/siglip-base-patch16-224"])
def test_saved_tower_config_is_found_for_a_relative_multi_part_path(tiny_ckpt, tmp_path, monkeypatch, configured):
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt, src)
    (src / "towers").mkdir()
    (src / "siglip-base-patch16-224").rename(src / "towers" / "siglip-base-patch16-224")
    _edit_config(src, mm_vision_tower=configured)
    monkeypatch.chdir(tmp_path)
    loaded = _load(src, vision_tower=src / "towers" / "siglip-base-patch16-224")
    out = save_checkpoint(loaded, tmp_path / "saved")
    assert (out / "siglip-base-patch16-224" / "config.json").is_file()
    assert checkpoint.resolve_dir(None, configured, out) == out / "siglip-base-patch16-224"
    again = _load(out)
    assert again.model.towers.vision.to_dict() == loaded.model.towers.vision.to_dict()
