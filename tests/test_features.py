"""The tower-feature store (omni_fast/features/): keys, entries, damage, mismatch, disk full, concurrent writers,
the store in front of the towers, and `omni-fast cache-features` end to end on the tiny checkpoint."""
import copy
import dataclasses
import errno
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from omni_fast import cli
from omni_fast.config import LoaderConfig
from omni_fast.features import key as fkey
from omni_fast.features.key import FeatureSettings, content_hash, towers_fingerprint
from omni_fast.features.memory import MEMORY, MemoryCache
from omni_fast.features.store import FeatureStore, StoreError, checksum, entry_checksum
from omni_fast.features.towers import CachedTowers
from omni_fast.data import Record
from omni_fast.media import loader as mloader
from omni_fast.media.loader import MediaLoader
from omni_fast.model.checkpoint import load_checkpoint
from omni_fast.testing import make_clip

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(omni):
    return omni.model


def _loader(model, aspect="pad", batch_size=8, audio=True) -> LoaderConfig:
    return LoaderConfig(batch_size=batch_size, backend="pyav", workers=2, prefetch=1, aspect=aspect,
                        num_frames=model.config.num_frames, n_mels=model.towers.audio.num_mel_bins, audio=audio)


def _settings(model, aspect="pad", modal="video_audio") -> FeatureSettings:
    return FeatureSettings.of(model, _loader(model, aspect), torch.device("cpu"), modal)


def _features(seed: int, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"vision": torch.randn(8, 196, 32, generator=g).to(dtype), "audio": torch.randn(500, 48, generator=g).to(dtype)}


def _reference(model, records, aspect="pad") -> tuple[torch.Tensor, torch.Tensor]:
    """The towers on every clip, no store."""
    batch = next(iter(MediaLoader(records, _loader(model, aspect, batch_size=len(records)), "cpu")))
    with torch.no_grad():
        return model.vision_features(batch.frames), model.audio_features(batch.mel)


def _entries(store: FeatureStore) -> list[Path]:
    return sorted(store.dir.glob("*/*.safetensors"))


def _leftovers(store: FeatureStore) -> list[Path]:
    return sorted(p for p in store.dir.rglob("*") if p.is_file() and p.suffix != ".safetensors"
                  and p.name != "settings.json")


# --- keys ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("towers", "0" * 64), ("dtype", "bfloat16"), ("device", "cuda"),
                                         ("media", "dali+swr"), ("preprocess", 99), ("num_frames", 7),
                                         ("aspect", "stretch"), ("modal", "video"), ("n_mels", 80)])
def test_every_setting_changes_the_key_and_is_named_when_it_differs(model, field, value):
    base = _settings(model)
    other = dataclasses.replace(base, **{field: value})
    assert other.digest != base.digest and other.key("ab" * 32) != base.key("ab" * 32)
    diff = base.differences(other.as_dict())
    assert len(diff) == 1 and diff[0].startswith(f"{field}: {value!r} there")


def test_settings_of_a_run(model):
    s = _settings(model, "stretch", "video")
    assert (s.dtype, s.device, s.aspect, s.modal, s.num_frames, s.n_mels) == \
        ("float32", "cpu", "stretch", "video", model.config.num_frames, model.towers.audio.num_mel_bins)
    assert s.media.startswith("pyav+") and s.preprocess == mloader.PREPROCESS_VERSION
    with pytest.raises(ValueError, match="aspect"):
        dataclasses.replace(s, aspect="crop")


def test_towers_fingerprint_follows_the_weights_not_the_object(model, tiny_ckpt):
    again = load_checkpoint(tiny_ckpt, device="cpu", dtype=torch.float32).model
    assert towers_fingerprint(again) == towers_fingerprint(model)  # content, not identity
    for part in ("vision_tower", "audio_tower"):
        nudged = copy.deepcopy(again)
        p = next(getattr(nudged.model, part).parameters())
        with torch.no_grad():
            p.view(-1)[3] = torch.nextafter(p.view(-1)[3], torch.tensor(1.0))  # one ulp of one weight
        assert towers_fingerprint(nudged) != towers_fingerprint(model), part
    layers = copy.deepcopy(again)
    layers.model.vision_tower.num_layers_run -= 1  # another mm_vision_select_layer
    assert towers_fingerprint(layers) != towers_fingerprint(model)
    half = copy.deepcopy(again).to(torch.bfloat16)
    assert towers_fingerprint(half) != towers_fingerprint(model)


def test_content_hash_follows_the_bytes(tmp_path, clips):
    a = shutil.copy(clips["mp4"], tmp_path / "a.mp4")
    assert content_hash(a) == content_hash(clips["mp4"])  # the bytes, not the path
    first = content_hash(a)
    data = bytearray(Path(a).read_bytes())
    data[len(data) // 2] ^= 1
    Path(a).write_bytes(bytes(data))  # rewritten in place, same size
    st = os.stat(a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # (coarse clocks: make the mtime move)
    assert content_hash(a) != first
    wav = tmp_path / "a.wav"
    wav.write_bytes(b"RIFF" + bytes(100))
    record = Record(video=Path(a), label="sad", index=0, source="dfew", audio=wav)
    assert content_hash(record) != content_hash(a)
    assert content_hash(record, uses_audio=False) == content_hash(a)
    with pytest.raises(FileNotFoundError):
        content_hash(tmp_path / "missing.mp4")


def test_remembered_hashes_are_bounded(tmp_path, monkeypatch):
    """A server hashes a new temporary file per request: the hashes remembered stay within _CONTENTS_KEPT, least
    recently used out, and a forgotten file is hashed again to the same value."""
    import hashlib

    monkeypatch.setattr(fkey, "_contents", type(fkey._contents)())
    monkeypatch.setattr(fkey, "_CONTENTS_KEPT", 2)
    files = [tmp_path / f"{i}.bin" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 100)
    digests = [content_hash(f) for f in files[:2]]
    content_hash(files[0])  # now the most recent: files[1] goes first
    content_hash(files[2])
    assert len(fkey._contents) == 2 and {m[0] for m in fkey._contents} == {str(files[0]), str(files[2])}
    assert content_hash(files[1]) == digests[1] == hashlib.sha256(bytes([1]) * 100).hexdigest()

# --- the store ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_put_then_get_gives_the_same_bits(model, tmp_path, dtype):
    settings = dataclasses.replace(_settings(model), dtype=str(dtype).removeprefix("torch."))
    store = FeatureStore(tmp_path / "store", settings)
    feats, info = _features(1, dtype), {"indices": [0, 3, 7], "num_frames_total": 9}
    assert store.get("ab" * 32) is None
    n = store.put("ab" * 32, feats, info)
    assert n == store.path("ab" * 32).stat().st_size > 0
    entry = store.get("ab" * 32)
    assert entry.info == info and entry.features.keys() == feats.keys()
    for k in feats:
        assert entry.features[k].dtype == dtype and torch.equal(entry.features[k], feats[k])
    assert store.put("ab" * 32, _features(2, dtype)) == 0  # never replaced
    assert torch.equal(store.get("ab" * 32).features["audio"], feats["audio"])
    s = store.stats
    assert (s.hits, s.misses, s.written, s.bytes_written, s.already_there) == (2, 1, 1, n, 1)
    again = FeatureStore(tmp_path / "store", settings)  # another process, later
    assert torch.equal(again.get("ab" * 32).features["vision"], feats["vision"])


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[:-100])


def _flip_data(p: Path):
    data = bytearray(p.read_bytes())
    data[-5000] ^= 0x10  # a tensor byte: only the checksum sees it
    p.write_bytes(bytes(data))


def _flip_header(p: Path):
    data = bytearray(p.read_bytes())
    data[12] ^= 0x01
    p.write_bytes(bytes(data))


def _empty(p: Path):
    p.write_bytes(b"")


def _other_clip(p: Path):
    shutil.copy(p.parent.parent / "cd" / ("cd" * 32 + ".safetensors"), p)  # a whole entry, of another clip


def _other_crc(p: Path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(p))
    with open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))["__metadata__"]
    tensors["audio"][0, 0] += 1  # written consistently by a buggy writer: the recorded checksum is the old one
    save_file(tensors, str(p), metadata=meta)


def _other_layout(p: Path):
    from safetensors.torch import load_file, save_file

    with open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))["__metadata__"]
    meta["layout"] = json.dumps({"vision": [1, 0, 2], "audio": [0, 1]})  # a valid order, but not the written one
    save_file(load_file(str(p)), str(p), metadata=meta)


@pytest.mark.parametrize("damage", [_truncate, _flip_data, _flip_header, _empty, _other_clip, _other_crc,
                                    _other_layout])
def test_a_damaged_entry_is_logged_removed_and_rewritten(model, tmp_path, caplog, damage):
    store = FeatureStore(tmp_path / "store", _settings(model))
    store.put("ab" * 32, _features(1))
    store.put("cd" * 32, _features(2))
    damage(store.path("ab" * 32))
    with caplog.at_level(logging.WARNING, logger="omni_fast.features.store"):
        assert store.get("ab" * 32) is None
    assert str(store.path("ab" * 32)) in caplog.text and "computed again and rewritten" in caplog.text
    assert not store.path("ab" * 32).exists() and store.stats.corrupt == 1
    assert store.put("ab" * 32, _features(1)) > 0  # the caller's recomputed features take its place
    assert torch.equal(store.get("ab" * 32).features["vision"], _features(1)["vision"])
    assert torch.equal(store.get("cd" * 32).features["vision"], _features(2)["vision"])
    assert not _leftovers(store)


def test_an_entry_keeps_the_towers_memory_layout(model, clips, tmp_path):
    """SigLIP's features come out patch-minor (a transposed view); read back from the store, and merged into a
    batch with computed rows, they have the towers' strides, so the projectors run the same kernels."""
    records = [clips["mp4"], clips["webm"], clips["avi"]]
    vision, audio = _reference(model, records)
    assert not vision.is_contiguous()  # (what makes this test mean something)
    store = FeatureStore(tmp_path / "store", _settings(model))
    store.put("ab" * 32, {"vision": vision[0], "audio": audio[0]})
    entry = store.get("ab" * 32)
    assert entry.features["vision"].stride() == vision[0].stride()
    assert torch.equal(entry.features["vision"], vision[0]) and torch.equal(entry.features["audio"], audio[0])
    towers = CachedTowers(model, store)
    _run(towers, model, [records[0]])  # stores the first clip under its real hash
    batch = next(iter(MediaLoader(records, _loader(model), "cpu", lookup=towers.lookup)))
    assert batch.found[0] is not None and batch.decoded == [1, 2]
    merged = towers.features(batch)
    assert merged.vision.stride() == vision.stride() and merged.audio.stride() == audio.stride()
    assert torch.equal(merged.vision, vision) and torch.equal(merged.audio, audio)


def test_checksum_covers_both_tensors():
    a, b = _features(1), _features(1)
    assert checksum(a) == checksum(b)
    b["audio"][499, 47] = torch.nextafter(b["audio"][499, 47], torch.tensor(10.0))
    assert checksum(a) != checksum(b)
    assert checksum({"vision": a["vision"]}) != checksum(a)


def _craft(store: FeatureStore, content: str, tensors: dict) -> None:
    """An entry with the right key and a right checksum, holding `tensors`."""
    from safetensors.torch import save_file

    store.path(content).parent.mkdir(exist_ok=True)
    meta = {"key": store.settings.key(content), "info": "{}",
            "layout": json.dumps({name: list(range(t.dim())) for name, t in tensors.items()})}
    save_file(tensors, str(store.path(content)), metadata={**meta, "crc32": entry_checksum(tensors, meta)})


@pytest.mark.parametrize("tensors", [{"vision": _features(1)["vision"]}, _features(1, torch.bfloat16)],
                         ids=["audio missing", "bfloat16 in a float32 store"])
def test_an_entry_without_the_settings_tensors_is_damaged(model, tmp_path, tensors, caplog):
    store = FeatureStore(tmp_path / "store", _settings(model))
    _craft(store, "ab" * 32, tensors)
    _craft(store, "cd" * 32, _features(2))
    assert store.get("ab" * 32) is None and store.stats.corrupt == 1 and "damaged" in caplog.text
    assert store.get("cd" * 32) is not None  # the same writer with the settings' tensors: whole
    with pytest.raises(ValueError, match="expected"):
        store.put("ab" * 32, tensors)  # and the store never writes one


def test_other_settings_are_kept_apart_with_a_line_naming_what_differs(model, tmp_path, caplog):
    pad = FeatureStore(tmp_path / "store", _settings(model, "pad"))
    pad.put("ab" * 32, _features(1))
    with caplog.at_level(logging.INFO, logger="omni_fast.features.store"):
        stretch = FeatureStore(tmp_path / "store", _settings(model, "stretch"))
    assert "aspect: 'pad' there, 'stretch' here" in caplog.text and pad.dir.name in caplog.text
    assert stretch.dir != pad.dir and stretch.get("ab" * 32) is None
    assert pad.get("ab" * 32) is not None


def test_a_store_made_otherwise_is_refused_naming_what_differs(model, tmp_path):
    settings = _settings(model)
    store = FeatureStore(tmp_path / "store", settings)
    (store.dir / "settings.json").write_text(json.dumps({**settings.as_dict(), "n_mels": 80}))
    with pytest.raises(StoreError, match=r"n_mels: 80 there, 128 here"):
        FeatureStore(tmp_path / "store", settings)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "store.json").write_text(json.dumps({"omni_fast_features": 99}))
    with pytest.raises(StoreError, match=r"store format 99"):
        FeatureStore(tmp_path / "old", settings)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "scores.json").write_text("{}")
    with pytest.raises(StoreError, match=r"holds other files \(scores.json\)"):
        FeatureStore(tmp_path / "results", settings)
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="not a directory"):
        FeatureStore(tmp_path / "file", settings)


def _disk_full(monkeypatch) -> list:
    """os.write writes half of what it is given, then fails as a full disk does."""
    calls, real = [], os.write

    def write(fd, data):
        calls.append(len(data))
        real(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)
    return calls


def test_disk_full_leaves_nothing_warns_once_and_goes_on(model, tmp_path, monkeypatch, caplog, clips):
    store = FeatureStore(tmp_path / "store", _settings(model))
    store.put("cd" * 32, _features(2))
    calls = _disk_full(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="omni_fast.features.store"):
        assert store.put("ab" * 32, _features(1)) == 0
        assert store.put("ef" * 32, _features(3)) == 0
    assert len(calls) == 1  # the first failure turned writing off
    warnings = [r for r in caplog.records if "cannot write" in r.message]
    assert len(warnings) == 1 and "No space left on device" in warnings[0].message
    assert not store.writable and store.stats.write_failures == 1
    assert _entries(store) == [store.path("cd" * 32)] and not _leftovers(store)  # no partial entry, no temporary
    assert torch.equal(store.get("cd" * 32).features["audio"], _features(2)["audio"])  # reads go on
    records = [clips["mp4"], clips["webm"]]
    towers = CachedTowers(model, store)
    batch = next(iter(MediaLoader(records, _loader(model), "cpu", lookup=towers.lookup)))
    got, (vision, audio) = towers.features(batch), _reference(model, records)
    assert torch.equal(got.vision, vision) and torch.equal(got.audio, audio)  # the run goes on, uncached


def test_writers_failing_at_once_warn_once(model, tmp_path, monkeypatch, caplog):
    store = FeatureStore(tmp_path / "store", _settings(model))
    both_in = threading.Barrier(2)

    def write(fd, data):  # both writers are past the 'writing is on' check when the disk fills
        both_in.wait(timeout=30)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)
    with caplog.at_level(logging.WARNING, logger="omni_fast.features.store"):
        threads = [threading.Thread(target=store.put, args=(c * 32, _features(1))) for c in ("ab", "cd")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert store.stats.write_failures == 2 and len([r for r in caplog.records if "cannot write" in r.message]) == 1
    assert not _entries(store) and not _leftovers(store)


_WRITTEN = {f"{i:06x}" + "0" * 58: _features(i) for i in range(1, 25)}  # made before the writers fork


def _writer(root: str, settings: dict, barrier, results) -> None:
    store = FeatureStore(root, FeatureSettings(**settings))
    barrier.wait()
    mine = [c for c, feats in _WRITTEN.items() if store.put(c, feats) > 0]
    results.put((os.getpid(), mine, store.stats.already_there))


def test_concurrent_writers_publish_each_entry_exactly_once(model, tmp_path):
    """Three processes put the same 24 entries at the same time while a fourth reads them."""
    settings = _settings(model)
    root = tmp_path / "store"
    FeatureStore(root, settings)
    contents = sorted(_WRITTEN)
    ctx = multiprocessing.get_context("fork")  # (the writers run no torch op: safe to fork)
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(root), settings.as_dict(), barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    reader = FeatureStore(root, settings)
    seen = [reader.get(c) for _ in range(3) for c in contents]  # reading while they write
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    published = [c for _, mine, _ in outcomes for c in mine]
    assert sorted(published) == contents  # each entry by exactly one writer
    assert sum(n for _, _, n in outcomes) == 2 * len(contents)  # the other two found it there
    assert reader.stats.corrupt == 0 and all(e is None or e.features["audio"].shape == (500, 48) for e in seen)
    for c in contents:
        assert torch.equal(reader.get(c).features["vision"], _WRITTEN[c]["vision"])
    assert not _leftovers(reader)


# --- the store in front of the towers -----------------------------------------------------------------------------
def test_the_towers_give_a_clip_the_same_bits_in_any_batch(model, clips):
    """The premise of 'the store never changes a result' on the CPU: a clip's features do not depend on the batch
    it was computed in (alone, with others, in another order)."""
    records = [clips[k] for k in ("mp4", "mp4_wide", "webm", "avi", "mp4_silent")]
    batch = next(iter(MediaLoader(records, _loader(model, batch_size=len(records)), "cpu")))
    with torch.no_grad():
        vision, audio = model.vision_features(batch.frames), model.audio_features(batch.mel)
        for i in range(len(records)):
            assert torch.equal(model.vision_features(batch.frames[i:i + 1])[0], vision[i])
            assert torch.equal(model.audio_features(batch.mel[i:i + 1])[0], audio[i])
        order = torch.tensor([3, 0, 4, 2])
        assert torch.equal(model.vision_features(batch.frames[order]), vision[order])
        assert torch.equal(model.audio_features(batch.mel[order]), audio[order])


class _Counting:
    """Counts decoded clips (the loader's _load) and rows through each tower."""

    def __init__(self, monkeypatch, model):
        self.decoded, self.vision_rows, self.audio_rows = 0, 0, 0
        load, vision, audio = mloader._load, model.vision_features, model.audio_features

        def counted_load(*a, **k):
            self.decoded += 1
            return load(*a, **k)

        def counted_vision(frames):
            self.vision_rows += frames.shape[0]
            return vision(frames)

        def counted_audio(mel):
            self.audio_rows += mel.shape[0]
            return audio(mel)

        monkeypatch.setattr(mloader, "_load", counted_load)
        monkeypatch.setattr(model, "vision_features", counted_vision)
        monkeypatch.setattr(model, "audio_features", counted_audio)


def _run(towers, model, records, batch_size=3):
    vision, audio, hits, misses = [], [], 0, 0
    for batch in MediaLoader(records, _loader(model, batch_size=batch_size), "cpu", lookup=towers.lookup):
        f = towers.features(batch)
        vision.append(f.vision)
        audio.append(f.audio)
        hits, misses = hits + f.hits, misses + f.misses
    return torch.cat(vision), torch.cat(audio), hits, misses


def test_cold_warm_and_mixed_stores_give_the_towers_bits(model, clips, tmp_path, monkeypatch):
    records = [clips[k] for k in ("mp4", "mp4_wide", "webm", "avi", "mp4_silent")]
    vision, audio = _reference(model, records)
    store = FeatureStore(tmp_path / "store", _settings(model))
    count = _Counting(monkeypatch, model)
    v, a, hits, misses = _run(CachedTowers(model, store), model, records)  # cold: fills the store
    assert torch.equal(v, vision) and torch.equal(a, audio) and (hits, misses) == (0, 5)
    assert len(_entries(store)) == 5 and count.decoded == 5
    count.decoded = count.vision_rows = count.audio_rows = 0
    v, a, hits, misses = _run(CachedTowers(model, store), model, records)  # warm: no decoding, no tower
    assert torch.equal(v, vision) and torch.equal(a, audio) and (hits, misses) == (5, 0)
    assert (count.decoded, count.vision_rows, count.audio_rows) == (0, 0, 0)
    for r in (records[0], records[2], records[3]):
        store.path(content_hash(r)).unlink()
    v, a, hits, misses = _run(CachedTowers(model, store), model, records)  # batches [miss hit miss] [miss hit]
    assert torch.equal(v, vision) and torch.equal(a, audio) and (hits, misses) == (2, 3)
    assert (count.decoded, count.vision_rows, count.audio_rows) == (3, 3, 3)
    stored = store.get(content_hash(records[3]))
    assert torch.equal(stored.features["vision"], vision[3]) and stored.info["num_frames_total"] > 0


def test_a_changed_clip_is_a_miss_and_a_missing_one_fails_as_without_a_store(model, tmp_path, caplog):
    clip = make_clip(tmp_path / "c.mp4", seconds=1.0, size=(64, 48), seed=1)
    store = FeatureStore(tmp_path / "store", _settings(model))
    _run(CachedTowers(model, store), model, [clip])
    replacement = make_clip(tmp_path / "new.mp4", seconds=1.0, size=(64, 48), seed=2)
    os.replace(replacement, clip)  # same path, other bytes
    vision, audio = _reference(model, [clip])
    v, a, hits, misses = _run(CachedTowers(model, store), model, [clip])
    assert (hits, misses) == (0, 1) and torch.equal(v, vision) and torch.equal(a, audio)
    assert len(_entries(store)) == 2  # the old bytes' entry stays, under the old hash
    missing = tmp_path / "gone.mp4"
    towers = CachedTowers(model, store)
    batches = list(MediaLoader([clip, missing], _loader(model), "cpu", lookup=towers.lookup))
    assert [f.path for f in batches[0].failures] == [str(missing)] and batches[0].found[0] is not None


def test_a_video_only_store_holds_the_vision_features_only(model, clips, tmp_path):
    settings = FeatureSettings.of(model, _loader(model, audio=False), torch.device("cpu"), "video")
    store = FeatureStore(tmp_path / "store", settings)
    towers = CachedTowers(model, store, modal="video")
    for _ in range(2):
        batch = next(iter(MediaLoader([clips["mp4"]], _loader(model, audio=False), "cpu", lookup=towers.lookup)))
        f = towers.features(batch)
        assert f.audio is None and f.vision.shape[0] == 1
    assert f.hits == 1 and set(store.get(content_hash(clips["mp4"], False)).features) == {"vision"}


# --- the encoder cache: clips' features in memory, bounded in bytes -------------------------------------------------
def _sized(nbytes: int, seed: int = 0) -> dict:
    return {"vision": torch.randn(nbytes // 4, generator=torch.Generator().manual_seed(seed))}  # float32


def test_the_encoder_cache_holds_at_most_its_bytes_and_evicts_the_least_recently_used_first():
    cache = MemoryCache(1000)
    assert cache.put("a", _sized(400, 1)) and cache.put("b", _sized(400, 2))
    assert cache.get("a") is not None  # a is now the most recently used
    assert cache.put("c", _sized(200, 3)) and cache.keys() == ["b", "a", "c"]  # 1000 bytes: fits exactly
    assert cache.put("d", _sized(400, 4)) and cache.keys() == ["a", "c", "d"]  # b out (least recently used), not a
    assert cache.put("e", _sized(600, 5)) and cache.keys() == ["d", "e"]  # a, then c out: until e fits
    s = cache.stats
    assert (s.bytes, s.entries, s.evictions, s.capacity) == (1000, 2, 3, 1000)
    assert not cache.put("huge", _sized(1004)) and cache.keys() == ["d", "e"]  # larger than the cache: not kept
    assert cache.put("d", _sized(400, 9)) and cache.keys() == ["e", "d"]  # held: made the most recent, once
    assert cache.stats.bytes == 1000 and torch.equal(cache.get("d").features["vision"], _sized(400, 4)["vision"])
    assert cache.get("b") is None and (cache.stats.hits, cache.stats.misses) == (2, 1)
    cache.clear()
    assert cache.keys() == [] and cache.stats.bytes == 0 and cache.get("d") is None
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="capacity must be a positive number of bytes"):
            MemoryCache(bad)


def test_an_encoder_cache_entry_is_a_cpu_copy_of_its_own_bytes_in_the_towers_layout():
    batch = torch.randn(3, 8, 5, 7).transpose(2, 3)  # (3, 8, 7, 5) rows patch-minor in memory, as SigLIP gives them
    cache = MemoryCache(10_000)
    cache.put("k", {"vision": batch[1], "audio": torch.randn(4, 6)}, {"indices": [0, 3]})
    entry = cache.get("k")
    held = entry.features["vision"]
    assert entry.source == MEMORY and entry.info == {"indices": [0, 3]}
    assert torch.equal(held, batch[1]) and held.stride() == batch[1].stride()
    assert held.untyped_storage().nbytes() == batch[1].numel() * 4  # not the whole batch's storage
    assert cache.stats.bytes == (8 * 7 * 5 + 4 * 6) * 4
    batch.add_(1)
    assert not torch.equal(held, batch[1])  # a copy: what the caller does with its batch afterwards is its own


def _sourced(towers, model, records, aspect="pad", batch_size=3):
    """The features of `records` through `towers` in batches -> (vision, audio, each clip's source)."""
    vision, audio, sources = [], [], []
    for batch in MediaLoader(records, _loader(model, aspect, batch_size), "cpu", lookup=towers.lookup):
        f = towers.features(batch)
        vision.append(f.vision)
        audio.append(f.audio)
        sources += f.sources
    return torch.cat(vision), torch.cat(audio), sources


def test_the_encoder_cache_in_front_of_the_towers_skips_decoding_and_gives_the_towers_bits(model, clips, monkeypatch):
    """Three clips computed, then five in batches [hit miss hit] [miss hit]: the hits are neither decoded nor
    computed, every row is the towers' own; the cache is keyed by FeatureSettings.key(content hash), so the same
    clips under other settings (aspect) are misses."""
    records = [clips[k] for k in ("mp4", "avi", "webm", "mp4_wide", "mp4_silent")]
    vision, audio = _reference(model, records)
    settings, cache = _settings(model), MemoryCache(1 << 30)
    count = _Counting(monkeypatch, model)
    first = [records[i] for i in (0, 2, 4)]
    _, _, sources = _sourced(CachedTowers(model, memory=cache, settings=settings), model, first)
    assert sources == ["towers"] * 3 and (count.decoded, count.vision_rows) == (3, 3)
    assert cache.keys() == [settings.key(content_hash(r)) for r in first]
    count.decoded = count.vision_rows = count.audio_rows = 0
    v, a, sources = _sourced(CachedTowers(model, memory=cache, settings=settings), model, records)
    assert sources == ["memory", "towers", "memory", "towers", "memory"]
    assert torch.equal(v, vision) and torch.equal(a, audio)
    assert (count.decoded, count.vision_rows, count.audio_rows) == (2, 2, 2)
    stretch = _settings(model, aspect="stretch")
    v, a, sources = _sourced(CachedTowers(model, memory=cache, settings=stretch), model, records[:2], "stretch")
    assert sources == ["towers", "towers"]
    want_v, want_a = _reference(model, records[:2], aspect="stretch")
    assert torch.equal(v, want_v) and torch.equal(a, want_a)
    with pytest.raises(ValueError, match="needs the FeatureSettings"):
        CachedTowers(model, memory=cache)


def test_a_store_hit_is_kept_in_the_encoder_cache_and_read_from_memory_next(model, clips, tmp_path, monkeypatch):
    records = [clips[k] for k in ("mp4", "webm")]
    vision, audio = _reference(model, records)
    store = FeatureStore(tmp_path / "store", _settings(model))
    _sourced(CachedTowers(model, store), model, records)  # fills the store
    cache = MemoryCache(1 << 30)
    reads = []
    get = store.get
    monkeypatch.setattr(store, "get", lambda content: reads.append(content) or get(content))
    for source in ("store", "memory"):
        reads.clear()
        v, a, sources = _sourced(CachedTowers(model, store, memory=cache), model, records)
        assert sources == [source] * 2 and torch.equal(v, vision) and torch.equal(a, audio)
        assert len(reads) == (2 if source == "store" else 0)  # memory hits never touch the disk
    with pytest.raises(ValueError, match="differ from the store's"):
        CachedTowers(model, store, memory=cache, settings=_settings(model, aspect="stretch"))


def test_a_clip_twice_in_one_run_goes_through_the_towers_once(model, clips, monkeypatch):
    """Batches of one: the second copy is found in the cache whether the loader asked before or after the first
    copy's batch was computed (then at use, see CachedTowers.features)."""
    count = _Counting(monkeypatch, model)
    towers = CachedTowers(model, memory=MemoryCache(1 << 30), settings=_settings(model))
    v, _, sources = _sourced(towers, model, [clips["mp4"], clips["mp4"]], batch_size=1)
    assert sources == ["towers", "memory"] and count.vision_rows == count.audio_rows == 1
    assert torch.equal(v[0], v[1])


# --- omni-fast cache-features -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    """Three clips, one of them listed twice, a missing clip, an undecodable one and a malformed entry."""
    d = tmp_path_factory.mktemp("cache")
    for i in range(3):
        make_clip(d / f"c{i}.mp4", seconds=1.0, size=(64, 48), seed=10 + i)
    (d / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    gpt = [{"from": "human", "value": "<video>\n<audio>\nQ"}, {"from": "gpt", "value": "sad"}]
    entries = [{"video": v, "conversations": gpt} for v in ("c0.mp4", "c1.mp4", "gone.mp4", "c1.mp4", "bad.mp4",
                                                            "c2.mp4")]
    entries.insert(3, {"video": "c0.mp4"})  # no conversations: a malformed entry
    (d / "train.json").write_text(json.dumps(entries))
    return d


def _cache(annotated, ckpt, store, capsys, *extra) -> tuple[int, str, str]:
    rc = cli.main(["cache-features", "--annotations", str(annotated / "train.json"), "--model_path", str(ckpt),
                   "--tower_cache_dir", str(store), "--device", "cpu", "--no_progress", "--batch_size", "2", *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cache_features_end_to_end(annotated, tiny_ckpt, model, tmp_path, capsys):
    rc, out, err = _cache(annotated, tiny_ckpt, tmp_path / "store", capsys)
    assert rc == 0, err
    assert "7 entries" in out and "3 computed and stored" in out and "0 already in the store" in out, out
    assert "4 skipped" in out and all(f"skipped 1: {k}" in out for k in (
        "clip file missing", "same clip content", "clip could not be decoded", "malformed annotation"))
    assert "entry 2" in err and "gone.mp4" in err and "entry 4" in err and "same content as entry 1" in err
    settings = _settings(model)
    assert settings.dtype == "float32"  # the CPU run's dtype, the pad aspect of training
    store = FeatureStore(tmp_path / "store", settings)  # the command's store is the trainer's on this machine
    clips = [annotated / f"c{i}.mp4" for i in range(3)]
    vision, audio = _reference(model, clips)
    for i, c in enumerate(clips):
        entry = store.get(content_hash(c))
        assert torch.equal(entry.features["vision"], vision[i]) and torch.equal(entry.features["audio"], audio[i])
    size = store.path(content_hash(clips[0])).stat().st_size
    assert f"{3 * size / 1e6:.1f} MB written" in out

    rc, out, _ = _cache(annotated, tiny_ckpt, tmp_path / "store", capsys)  # resumes: nothing left to do
    assert rc == 0 and "0 computed and stored" in out and "3 already in the store" in out, out
    store.path(content_hash(clips[2])).unlink()  # as if interrupted before the last clip
    rc, out, _ = _cache(annotated, tiny_ckpt, tmp_path / "store", capsys)
    assert rc == 0 and "1 computed and stored" in out and "2 already in the store" in out, out

    rc, out, _ = _cache(annotated, tiny_ckpt, tmp_path / "store", capsys, "--aspect", "stretch")
    assert rc == 0 and "3 computed and stored" in out and "stretch" in out  # kept apart, beside the pad features
    assert len([d for d in (tmp_path / "store").iterdir() if d.is_dir()]) == 2


def test_cache_features_on_a_full_disk_says_what_was_not_stored(annotated, tiny_ckpt, model, tmp_path, capsys,
                                                                 monkeypatch, caplog):
    FeatureStore(tmp_path / "store", _settings(model))  # the store was made; then the disk fills up
    calls = _disk_full(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="omni_fast.features.store"):
        rc, out, err = _cache(annotated, tiny_ckpt, tmp_path / "store", capsys)
    assert rc == 0 and "0 computed and stored" in out and "skipped 3: computed but not written" in out, out
    assert len(calls) == 1 and len([r for r in caplog.records if "cannot write" in r.message]) == 1
    assert not list((tmp_path / "store").glob("*/*/*"))  # no entry, no temporary file
    rc, _, err = _cache(annotated, tiny_ckpt, tmp_path / "new", capsys)  # no store can even be made
    assert rc == 2 and "cannot write" in err and "No space left on device" in err and len(err.splitlines()) == 1


def test_cache_features_bad_arguments_are_one_line(annotated, tiny_ckpt, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    rc, _, err = _cache(annotated, tiny_ckpt, tmp_path / "taken", capsys)
    assert rc == 2 and "holds other files (notes.txt)" in err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    rc = cli.main(["cache-features", "--annotations", str(tmp_path / "none.json"), "--model_path", str(tiny_ckpt),
                   "--tower_cache_dir", str(tmp_path / "s")])
    assert rc == 2 and "none.json" in capsys.readouterr().err


@pytest.mark.slow
def test_cache_features_under_torchrun_computes_each_clip_once(annotated, tiny_ckpt, model, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "omni_fast.cli", "cache-features", "--annotations", str(annotated / "train.json"), "--model_path",
           str(tiny_ckpt), "--tower_cache_dir", str(tmp_path / "store"), "--device", "cpu", "--no_progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("cache-features:") == 1  # rank 0 reports for the job
    assert "3 computed and stored" in proc.stdout and "4 skipped" in proc.stdout, proc.stdout
    assert "another process" not in proc.stdout + proc.stderr  # no entry was computed by two ranks
    store = FeatureStore(tmp_path / "store", _settings(model))
    clips = [annotated / f"c{i}.mp4" for i in range(3)]
    vision, audio = _reference(model, clips)
    for i, c in enumerate(clips):
        assert torch.equal(store.get(content_hash(c)).features["audio"], audio[i])
    assert store.stats.corrupt == 0 and not _leftovers(store)


def test_the_fingerprint_is_computed_once_per_tower(model, monkeypatch):
    towers_fingerprint(model)
    monkeypatch.setattr(fkey, "_tower_digest", lambda t: pytest.fail("hashed again"))
    towers_fingerprint(model)


# --- the store under OmniModel, infer and eval: it never changes a result -----------------------------------------
def _stored_model(omni, root):
    from omni_fast.api import OmniModel

    return OmniModel(omni.loaded, loader_config=omni.loader_config, tower_cache_dir=root, encoder_cache_bytes=0)


def _completions(generations):
    return [[(c.token_ids, c.logprobs) for c in g.completions] for g in generations]


def test_recognize_and_generate_give_the_same_tokens_and_logprobs_from_a_cold_and_a_warm_store(omni, clips, tmp_path):
    from omni_fast.config import SamplingParams

    videos = [clips[k] for k in ("mp4", "webm", "avi", "mp4_wide", "mp4_silent")]
    params = SamplingParams(n=3, temperature=1.0, top_k=20, max_tokens=10, seed=5)
    plain = _stored_model(omni, None)  # no store, and none of the prompts' KV other tests left in omni's engine
    plain_greedy = plain.generate(videos, sampling=SamplingParams.greedy_params(12), batch_size=2)
    plain_sampled = plain.generate(videos, sampling=params, batch_size=2, modal="video", aspect="pad")
    stored = _stored_model(omni, tmp_path / "store")
    for source in ("towers", "store"):  # cold (fills the store), then warm (reads it)
        greedy = stored.generate(videos, sampling=SamplingParams.greedy_params(12), batch_size=2)
        sampled = stored.generate(videos, sampling=params, batch_size=2, modal="video", aspect="pad")
        for got, want in ((greedy, plain_greedy), (sampled, plain_sampled)):
            assert [g.texts for g in got] == [g.texts for g in want]
            for a, b in zip(_completions(got), _completions(want)):
                assert [ids for ids, _ in a] == [ids for ids, _ in b]
                assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b))  # the same bits, not close ones
            assert [g.features_from for g in got] == [source] * len(videos)
    folders = sorted(d.name for d in (tmp_path / "store").iterdir() if d.is_dir())
    assert len(folders) == 2  # (stretch, video_audio) and (pad, video): kept apart
    assert [r.features_from for r in stored.recognize(videos[:2], max_new_tokens=4)] == ["store", "store"]


def test_a_store_that_cannot_be_written_warns_once_and_the_run_goes_on(omni, clips, tmp_path, monkeypatch, caplog):
    want = omni.recognize([clips["mp4"]], max_new_tokens=6)
    _disk_full(monkeypatch)
    stored = _stored_model(omni, tmp_path / "store")
    with caplog.at_level(logging.WARNING, logger="omni_fast"):
        got = [stored.recognize([clips["mp4"]], max_new_tokens=6) for _ in range(2)]
    assert [r.token_ids for g in got for r in g] == [want[0].token_ids] * 2
    assert [r.features_from for g in got for r in g] == ["towers", "towers"]
    assert len([r for r in caplog.records if "going on without the tower-feature store" in r.message]) == 1


def _eval_rows(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("seconds", "features_from")}
            for row in map(json.loads, path.read_text().splitlines()[1:])]


def test_eval_is_the_same_with_and_without_the_store_and_reports_its_hits(tiny_ckpt, clips, tmp_path, capsys):
    entries = [{"video": str(clips[k]), "conversations": [{"from": "human", "value": "<video>\n<audio>\nq"},
                                                          {"from": "gpt", "value": label}]}
               for k, label in (("mp4", "sad"), ("webm", "angry"), ("mp4_wide", "fear"), ("avi", "happy"))]
    entries.insert(1, {"video": str(tmp_path / "missing.mp4"), "conversations": entries[0]["conversations"]})
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps(entries))

    def run(name, *extra):
        rc = cli.main(["eval", "--model_path", str(tiny_ckpt), "--annotations", str(ann), "--max_new_tokens", "12",
                       "--out", str(tmp_path / f"{name}.json"), "--device", "cpu", "--batch_size", "3",
                       "--no_progress", *extra])
        assert rc == 0
        return capsys.readouterr().out

    plain = run("plain")
    assert "tower features" not in plain
    cold = run("cold", "--tower_cache_dir", str(tmp_path / "store"))
    warm = run("warm", "--tower_cache_dir", str(tmp_path / "store"))
    assert "tower features (this run): 0 read from the store, 4 computed and stored" in cold
    assert "tower features (this run): 4 read from the store, 0 computed and stored" in warm
    rows = {n: _eval_rows(tmp_path / f"{n}.jsonl") for n in ("plain", "cold", "warm")}
    assert rows["plain"] == rows["cold"] == rows["warm"] and len(rows["plain"]) == 5  # texts, predictions, errors
    scores = {n: json.loads((tmp_path / f"{n}.json").read_text())["scores"] for n in ("plain", "cold", "warm")}
    assert scores["warm"]["tower_cache"] == {"hits": 4, "misses": 0} and "tower_cache" not in scores["plain"]
    assert {k: v for k, v in scores["warm"].items() if k != "tower_cache"} == scores["plain"]
    froms = [json.loads(line).get("features_from") for line in (tmp_path / "warm.jsonl").read_text().splitlines()[1:]]
    assert froms == ["store", None, "store", "store", "store"]  # the missing clip: an error row, as without a store


def test_infer_json_says_where_the_features_came_from(tiny_ckpt, clips, tmp_path, capsys):
    args = ["infer", "--model_path", str(tiny_ckpt), "--video_path", str(clips["mp4"]), "--max_new_tokens", "4",
            "--device", "cpu", "--json", "--tower_cache_dir", str(tmp_path / "store")]
    lines = []
    for _ in range(2):
        assert cli.main(args) == 0
        lines.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert [line["features_from"] for line in lines] == ["towers", "store"]
    assert lines[0]["text"] == lines[1]["text"]


# --- the store in training: the same run, bit for bit -------------------------------------------------------------
def _recording_completions(monkeypatch) -> list:
    from omni_fast.grpo import step as grpo_step_module

    seen, real = [], grpo_step_module.sample_completions

    def recording(*a, **k):
        out = real(*a, **k)
        seen.append([[c.token_ids for c in done] for done in out])  # per micro-batch, its completions' ids
        return out

    monkeypatch.setattr(grpo_step_module, "sample_completions", recording)
    return seen


def _train(task, ckpt, out, stage, store, **overrides):
    from omni_fast.grpo.trainer import Trainer
    from omni_fast.toy import toy_config

    trainer = Trainer(toy_config(task, ckpt, out, stage, progress=False, tower_cache_dir=store, **overrides))
    return trainer, trainer.train()


def _same_metrics(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        keys = {k for k in x if not k.startswith(("time/", "tower_cache/")) and k != "tokens_per_s"}
        assert keys == {k for k in y if not k.startswith(("time/", "tower_cache/")) and k != "tokens_per_s"}
        for k in keys:
            assert x[k] == y[k] or (x[k] != x[k] and y[k] != y[k]), (x["step"], k, x[k], y[k])  # exact (NaN: NaN)


def _same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_training_with_the_store_is_the_same_run_over_two_epochs(tiny_ckpt, tmp_path, monkeypatch):
    """The learning test's toy task: SFT over two epochs without a store and with a cold one, then GRPO (the
    learning test's settings) over two epochs without a store and on the store SFT filled: the same losses,
    metrics, generated tokens and weights, bit for bit; the store's runs compute each clip once."""
    from omni_fast.toy import make_toy_task

    torch.set_num_threads(2)
    task = make_toy_task(tmp_path / "task")  # 12 clips; SFT's 36 entries use each 3 times, GRPO's 12 once
    store = str(tmp_path / "store")
    sft_plain, plain_history = _train(task, tiny_ckpt, tmp_path / "sft-plain", "sft", None, max_steps=18)
    sft_store, store_history = _train(task, tiny_ckpt, tmp_path / "sft-store", "sft", store, max_steps=18)
    _same_metrics(plain_history, store_history)
    _same_weights(sft_plain.last_checkpoint, sft_store.last_checkpoint)
    assert sft_plain.pos.epoch == 1  # two epochs: 2 x 9 steps of 4 entries
    assert sum(m["tower_cache/misses"] for m in store_history) == 12  # each clip through the towers once
    assert sum(m["tower_cache/hits"] for m in store_history) == 2 * 36 - 12
    assert "tower_cache/hits" not in plain_history[0]

    tokens = _recording_completions(monkeypatch)
    grpo_plain, plain_history = _train(task, sft_plain.last_checkpoint, tmp_path / "grpo-plain", "grpo", None,
                                       max_steps=2)
    plain_tokens, tokens[:] = list(tokens), []
    grpo_store, store_history = _train(task, sft_store.last_checkpoint, tmp_path / "grpo-store", "grpo", store,
                                       max_steps=2)
    assert tokens == plain_tokens and len(tokens) == 2  # every completion of both epochs, token for token
    _same_metrics(plain_history, store_history)
    _same_weights(grpo_plain.last_checkpoint, grpo_store.last_checkpoint)
    assert grpo_plain.pos.epoch == 1  # two epochs: one step of all 12 clips each
    # the SFT checkpoint carries the same frozen towers: GRPO reads what SFT stored, decodes and encodes nothing
    assert [(m["tower_cache/hits"], m["tower_cache/misses"]) for m in store_history] == [(12, 0), (12, 0)]
    assert len(list(Path(store).glob("*/*/*.safetensors"))) == 12
