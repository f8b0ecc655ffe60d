"""Annotation files (R1-Omni / HumanOmni formats) read into records, with errors that name file and entry."""
import json

import pytest

from omni_fast.data import AnnotationError, Record, load_annotations, parse_entry, with_sidecar_audio


def _conv(video, answer, question="<video>\n<audio>\nWhat emotion?"):
    return {"video": video, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def _write(tmp_path, data, name="ann.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_conversation_format(tmp_path):
    entries = [_conv("DFEW/videos/1.mp4", "sad"), _conv("MAFW/clips/00025.mp4", " anxious "),
               _conv("/abs/EMER/x.mp4", "<think>She frowns.</think>\n<answer>angry</answer>"),
               {**_conv("DFEW/videos/7.mp4", "happy"), "clip_meta_path": "meta/7.json"}]
    recs = load_annotations(_write(tmp_path, entries))
    assert [r.label for r in recs] == ["sad", "anxious", "angry", "happy"]
    assert [r.source for r in recs] == ["dfew", "mafw", "dfew", "dfew"]
    assert recs[0].video == tmp_path / "DFEW/videos/1.mp4" and str(recs[2].video) == "/abs/EMER/x.mp4"
    assert recs[2].target.startswith("<think>") and recs[0].question.startswith("<video>")
    assert recs[3].extra == {"clip_meta_path": "meta/7.json"} and [r.index for r in recs] == [0, 1, 2, 3]
    other = load_annotations(_write(tmp_path, entries), data_root=tmp_path / "data")
    assert other[0].video == tmp_path / "data/DFEW/videos/1.mp4"


def test_ravdess_format_and_containers(tmp_path):
    entry = {"ori_path": "Actor_01/01-01-06-01-02-01-01.mp4", "crop_path": "c.mp4",
             "QA_question": "Which emotion? Answer:fearful"}
    recs = load_annotations(_write(tmp_path, {"data": [entry]}))
    assert (recs[0].label, recs[0].source, recs[0].video) == ("fearful", "ravdess",
                                                               tmp_path / "Actor_01/01-01-06-01-02-01-01.mp4")
    lines = "\n".join(json.dumps(e) for e in [_conv("a.mp4", "sad"), entry]) + "\n\n"
    assert [r.label for r in load_annotations(_write(tmp_path, lines, "ann.jsonl"))] == ["sad", "fearful"]


@pytest.mark.parametrize("data,match", [
    ("{not json", "not valid JSON"),
    ({"videos": []}, "expected a JSON list"),
    ([_conv("a.mp4", "sad"), "just a string"], "entry 1: expected an object"),
    ([{"video": "a.mp4"}], "entry 0: neither the conversation format"),
    ([_conv("", "sad")], "entry 0: missing or empty 'video'"),
    ([_conv("a.mp4", "sad"), {"video": "b.mp4", "conversations": [{"from": "human", "value": "q"}]}],
     "entry 1: no non-empty 'gpt' turn"),
    ([_conv("a.mp4", "<answer> </answer>")], "entry 0: the <answer> tag of the 'gpt' turn is empty"),
    ([{"video": "a.mp4", "conversations": "sad"}], "entry 0: 'conversations' must be a list"),
    ([{"ori_path": "a.mp4", "QA_question": "no label here"}], "entry 0: 'QA_question' must be a string"),
    ([{"ori_path": "a.mp4", "QA_question": "Answer: "}], "entry 0: 'QA_question' has an empty label"),
    ([{"QA_question": "Answer:sad"}], "entry 0: missing or empty 'ori_path'"),
])
def test_bad_entries_name_the_file_and_index(tmp_path, data, match):
    path = _write(tmp_path, data, "bad_ann.json")
    with pytest.raises(AnnotationError, match=match) as info:
        load_annotations(path)
    assert "bad_ann.json" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(AnnotationError, match="nope.json: no such annotation file"):
        load_annotations(tmp_path / "nope.json")


def test_sidecar_audio(tmp_path):
    (tmp_path / "a.flac").write_bytes(b"x")
    (tmp_path / "a.wav").write_bytes(b"x")
    recs = [parse_entry(_conv(n, "sad"), i, tmp_path) for i, n in enumerate(["a.mp4", "b.mp4"])]
    recs.append(Record(video=tmp_path / "a.mp4", label="sad", index=2, source="dfew", audio=tmp_path / "keep.ogg"))
    with_sidecar_audio(recs)
    assert [r.audio for r in recs] == [tmp_path / "a.wav", None, tmp_path / "keep.ogg"]
