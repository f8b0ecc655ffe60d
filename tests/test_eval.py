"""WAR / UAR as R1-Omni's eval scripts define them, and the eval command end to end."""
import json
from pathlib import Path

import pytest

from omni_fast import cli
from omni_fast.eval import ground_truth, prediction, score, war_uar
from omni_fast.grpo.data import Record


def _reference_war_uar(y_true, y_pred):
    """recall_score(average=None, labels=unique(y_true)), weighted by class frequency (WAR) or not (UAR)."""
    labels = sorted(set(y_true))
    recalls = [sum(t == p == c for t, p in zip(y_true, y_pred)) / y_true.count(c) for c in labels]
    weights = [y_true.count(c) / len(y_true) for c in labels]
    return 100 * sum(w * r for w, r in zip(weights, recalls)), 100 * sum(recalls) / len(recalls)


@pytest.mark.parametrize("y_true,y_pred", [
    (["sad", "sad", "happy", "angry"], ["sad", "happy", "happy", "fear"]),
    (["a"] * 7 + ["b"], ["a"] * 8),
    (["x", "y", "z"], ["y", "z", "x"]),
])
def test_war_uar(y_true, y_pred):
    war, uar = war_uar(y_true, y_pred)
    ref_war, ref_uar = _reference_war_uar(y_true, y_pred)
    assert war == pytest.approx(ref_war) and uar == pytest.approx(ref_uar)
    assert war == pytest.approx(100 * sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true))  # WAR = accuracy


def test_war_uar_bad_input():
    with pytest.raises(ValueError, match="2 labels but 1"):
        war_uar(["a", "b"], ["a"])


@pytest.mark.parametrize("source,label,expected", [
    ("ravdess", "fearful", "fear"), ("ravdess", "surprised", "surprise"), ("ravdess", " fearful\n", "fear"),
    ("ravdess", "happy", "happy"), ("ravdess", "fear", "fear"),
    ("dfew", "fearful", "fearful"), ("mafw", "surprised", "surprised"), ("dfew", " sad ", "sad"),
])
def test_ground_truth_renames_ravdess_labels_only(source, label, expected):
    """eval_ravedess.py's renames (fearful -> fear, surprised -> surprise) apply to RAVDESS records only."""
    assert ground_truth(Record(video=Path("x.mp4"), label=label, index=0, source=source)) == expected


def test_prediction_and_per_source_scores():
    assert prediction("<think>x</think>\n<answer>sad</answer>") == "sad"
    assert prediction("  happy \n") == "happy"
    rows = [{"gt": "sad", "prediction": "sad", "source": "dfew"}, {"gt": "happy", "prediction": "sad", "source": "dfew"},
            {"gt": "fear", "prediction": "fear", "source": "mafw"}]
    report = score(rows)
    assert report.by_source["dfew"] == {"war": 50.0, "uar": 50.0, "clips": 2}
    assert report.by_source["mafw"]["war"] == 100.0 and report.war == pytest.approx(200 / 3)


def test_eval_command_scores_and_reports_skipped_clips(tiny_ckpt, clips, tmp_path, capsys):
    entries = [{"video": str(clips["mp4"]), "conversations": [{"from": "human", "value": "<video>\n<audio>\nq"},
                                                               {"from": "gpt", "value": "sad"}]},
               {"video": "MAFW/missing.mp4", "conversations": [{"from": "human", "value": "q"},
                                                               {"from": "gpt", "value": "happy"}]},
               {"video": str(clips["webm"]), "conversations": [{"from": "human", "value": "q"},
                                                                {"from": "gpt", "value": "<answer>angry</answer>"}]}]
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps(entries))
    out = tmp_path / "results" / "eval.json"
    rc = cli.main(["eval", "--model_path", str(tiny_ckpt), "--annotations", str(ann), "--max_new_tokens", "6",
                   "--out", str(out), "--device", "cpu"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "missing.mp4" in captured.err and "all" in captured.out
    saved = json.loads(out.read_text())
    assert [r["gt"] for r in saved["results"]] == ["sad", "angry"]
    assert saved["scores"]["clips"] == 2 and len(saved["scores"]["skipped"]) == 1
    assert not list(out.parent.glob(".*tmp*"))


def test_eval_refuses_bad_out_and_limit_before_loading(tiny_ckpt, tmp_path, capsys, monkeypatch):
    from omni_fast.api import OmniModel

    monkeypatch.setattr(OmniModel, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("model loaded")))
    ann = tmp_path / "val.json"
    ann.write_text("[]")
    base = ["eval", "--model_path", str(tiny_ckpt), "--annotations", str(ann)]
    (tmp_path / "adir").mkdir()
    cases = [(["--out", str(ann)], "is one of the inputs"), (["--out", str(tmp_path / "adir")], "is a directory"),
             (["--limit", "0"], "--limit 0"), (["--limit", "-1"], "--limit -1")]
    for extra, message in cases:
        assert cli.main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert ann.read_text() == "[]"  # the annotations were not replaced
