"""WAR / UAR as R1-Omni's eval scripts define them, and the eval command end to end."""
import json
import logging
from pathlib import Path

import pytest

from omni_fast import cli
from omni_fast.api import OmniModel
from omni_fast.eval import confusion_matrix, ground_truth, label_sets_for, prediction, score, war_uar
from omni_fast.task import LABEL_SETS
from omni_fast.data import Record


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
    assert prediction("<think>x</think>\n<answer> sad\n</answer><answer>happy</answer>") == "sad"
    assert prediction("  happy \n") == "happy"
    rows = [{"label": "sad", "prediction": "sad", "source": "dfew"},
            {"label": "happy", "prediction": "sad", "source": "dfew"},
            {"label": "fear", "prediction": "fear", "source": "mafw"}]
    report = score(rows)
    assert report.by_source["dfew"] == {"war": 50.0, "uar": 50.0, "clips": 2}
    assert report.by_source["mafw"]["war"] == 100.0 and report.war == pytest.approx(200 / 3)
    assert report.clips == 3


def test_confusion_matrix_counts_every_pair():
    cm = confusion_matrix(["sad", "sad", "happy", "sad"], ["sad", "happy", "happy", "<think>no tag"])
    assert cm["labels"] == ["happy", "sad"] and cm["columns"] == ["happy", "sad", "other"]
    assert cm["matrix"] == [[1, 0, 0], [1, 1, 1]]


def _row(label, pred, source="dfew", text=None):
    return {"label": label, "prediction": pred, "source": source,
            "text": f"<answer>{pred}</answer>" if text is None else text}


def test_labels_outside_the_label_set_are_counted_not_scored(caplog):
    rows = [_row("sad", "sad"), _row("happy", "sad"), _row("Sad", "sad"), _row("Sad", "Sad"),
            _row("excited", "happy", "mafw"), _row("calm", "calm", "ravdess"), _row("sad", "sad", text="sad")]
    with caplog.at_level(logging.WARNING, logger="omni_fast.eval"):
        report = score(rows, label_sets=LABEL_SETS)
    assert report.outside_label_set == {"Sad": 2, "excited": 1}
    assert report.clips == 4
    assert set(report.recall) == {"sad", "happy", "calm"}  # no class "Sad" or "excited"
    assert report.uar == pytest.approx(100 * (1.0 + 0.0 + 1.0) / 3)
    assert report.unparsable == 1  # the bare "sad" response
    assert "2 clip(s) labelled 'Sad'" in caplog.text and "excited" in caplog.text
    assert score(rows).outside_label_set == {} and "Sad" in score(rows).recall  # label_sets None: as found


def test_label_sets_auto():
    dfew = [Record(video=Path("a.mp4"), label="sad", index=0, source="dfew")]
    custom = [Record(video=Path("a.mp4"), label="red", index=0, source="dfew")]
    ravdess = [Record(video=Path("a.mp4"), label="fearful", index=0, source="ravdess")]
    assert label_sets_for(dfew) is LABEL_SETS and label_sets_for(ravdess) is LABEL_SETS
    assert label_sets_for(custom) is None
    assert len(LABEL_SETS["dfew"]) == 7 and len(LABEL_SETS["mafw"]) == 11 and len(LABEL_SETS["ravdess"]) == 8


# --- the command, end to end -------------------------------------------------------------------------------------
def _entry(video, label):
    return {"video": str(video), "conversations": [{"from": "human", "value": "<video>\n<audio>\nq"},
                                                   {"from": "gpt", "value": label}]}


@pytest.fixture
def annotations(clips, tmp_path):
    entries = [_entry(clips["mp4"], "sad"), _entry("MAFW/missing.mp4", "happy"),
               _entry(clips["webm"], "<answer>angry</answer>"), _entry(clips["mp4_wide"], "fear")]
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps(entries))
    return ann


def _eval(tiny_ckpt, ann, out, *extra):
    return cli.main(["eval", "--model_path", str(tiny_ckpt), "--annotations", str(ann), "--max_new_tokens", "4",
                     "--out", str(out), "--device", "cpu", "--batch_size", "2", *extra])


@pytest.fixture
def calls(monkeypatch):
    """The clips each recognize_iter call was given (the model's work, counted)."""
    seen = []
    real = OmniModel.recognize_iter

    def counting(self, videos, *a, **k):
        seen.append([str(getattr(v, "video", v)) for v in videos])
        return real(self, videos, *a, **k)
    monkeypatch.setattr(OmniModel, "recognize_iter", counting)
    return seen


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_command_scores_streams_and_reports_skipped_clips(tiny_ckpt, annotations, tmp_path, capsys, calls):
    out = tmp_path / "results" / "eval.json"
    assert _eval(tiny_ckpt, annotations, out) == 0
    captured = capsys.readouterr()
    assert "missing.mp4" in captured.err and "all" in captured.out and "unparsable" in captured.out
    warned = [line for line in captured.err.splitlines() if "WARNING" in line]
    assert warned and all(line.startswith("omni-fast: WARNING: ") for line in warned)  # one line each, logged
    assert any("missing.mp4" in line for line in warned) and "UserWarning" not in captured.err
    saved = json.loads(out.read_text())
    assert [r["label"] for r in saved["results"]] == ["sad", "angry", "fear"]  # the skipped clip is in "skipped"
    assert saved["scores"]["clips"] == 3 and len(saved["scores"]["skipped"]) == 1
    assert saved["scores"]["confusion"]["labels"] == ["angry", "fear", "sad"]
    assert sum(map(sum, saved["scores"]["confusion"]["matrix"])) == 3
    header, *rows = _lines(out.with_suffix(".jsonl"))
    assert header["omni_fast_eval"] == 1 and header["max_new_tokens"] == 4
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert set(rows[0]) >= {"video", "label", "prediction", "reasoning", "text", "finish_reason", "seconds"}
    assert rows[0]["seconds"] > 0 and rows[1]["finish_reason"] == "error" and "missing.mp4" in rows[1]["error"]
    assert [r["text"] for r in rows if "error" not in r] == [r["text"] for r in saved["results"]]
    assert not list(out.parent.glob(".*tmp*")) and not list(out.parent.glob("*.part"))
    assert len(calls) == 1 and len(calls[0]) == 4
    # the reference eval's prompt and generation length are the defaults
    from omni_fast.task import EVAL_QUESTION
    assert _lines(out.with_suffix(".jsonl"))[0]["instruct"] == EVAL_QUESTION


def test_eval_resumes_where_it_stopped_and_drops_a_torn_line(tiny_ckpt, annotations, tmp_path, capsys, calls):
    out = tmp_path / "eval.json"
    results = out.with_suffix(".jsonl")
    assert _eval(tiny_ckpt, annotations, out) == 0
    complete = _lines(results)
    first = json.loads(out.read_text())
    # a crash after the first clip, halfway through writing the third line
    lines = results.read_text().splitlines(keepends=True)
    results.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    calls.clear()
    assert _eval(tiny_ckpt, annotations, out) == 0
    # the first clip is not recognised again; the missing clip (an error) is tried again
    assert calls == [[str(annotations.parent / "MAFW/missing.mp4"), complete[3]["video"], complete[4]["video"]]]
    again = _lines(results)
    assert [r["index"] for r in again[1:]] == [0, 1, 2, 3]
    assert again[1] == complete[1]  # the kept result is the one written the first time
    assert [r["text"] for r in again[1:]] == [r["text"] for r in complete[1:]]
    assert json.loads(out.read_text())["scores"] == first["scores"]
    calls.clear()
    assert _eval(tiny_ckpt, annotations, out) == 0  # everything done: only the undecodable clip is retried
    assert calls == [[str(annotations.parent / "MAFW/missing.mp4")]]


def test_eval_resumes_from_the_part_files_of_an_interrupted_torchrun_job(tiny_ckpt, annotations, tmp_path, calls):
    out = tmp_path / "eval.json"
    results = out.with_suffix(".jsonl")
    assert _eval(tiny_ckpt, annotations, out) == 0
    header, *rows = results.read_text().splitlines(keepends=True)
    results.write_text(header + rows[0])  # what rank 0 had merged: nothing; say the main file held clip 0
    (tmp_path / "eval.jsonl.rank1.part").write_text(header + rows[2] + rows[3][:20])  # rank 1: clip 2, then torn
    (tmp_path / "eval.jsonl.rank0.part").write_text(header)
    calls.clear()
    assert _eval(tiny_ckpt, annotations, out) == 0
    assert calls == [[json.loads(rows[1])["video"], json.loads(rows[3])["video"]]]
    assert not list(tmp_path.glob("*.part"))  # merged into the results file, in record order
    merged = results.read_text().splitlines(keepends=True)
    assert merged[0] == header and merged[1] == rows[0] and merged[3] == rows[2]
    assert [json.loads(r)["index"] for r in merged[1:]] == [0, 1, 2, 3]


def test_eval_overwrite_starts_over(tiny_ckpt, annotations, tmp_path, calls):
    out = tmp_path / "eval.json"
    assert _eval(tiny_ckpt, annotations, out) == 0
    results = out.with_suffix(".jsonl")
    text = results.read_text()
    results.write_text(text + "{not json, a torn middle line}\n" + text.splitlines()[1] + "\n")
    calls.clear()
    assert _eval(tiny_ckpt, annotations, out, "--overwrite") == 0
    assert [len(c) for c in calls] == [4]
    assert [r["index"] for r in _lines(results)[1:]] == [0, 1, 2, 3]


def test_eval_ctrl_c_keeps_finished_results_and_exits_130(tiny_ckpt, annotations, tmp_path, capsys, monkeypatch):
    real = OmniModel.recognize_iter

    def interrupted(self, videos, *a, **k):
        for i, r in enumerate(real(self, videos, *a, **k)):
            if i == 1:
                raise KeyboardInterrupt
            yield r
    monkeypatch.setattr(OmniModel, "recognize_iter", interrupted)
    out = tmp_path / "eval.json"
    assert _eval(tiny_ckpt, annotations, out) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and str(out.with_suffix(".jsonl")) in err and "Traceback" not in err
    header, *rows = _lines(out.with_suffix(".jsonl"))  # every line whole
    assert [r["index"] for r in rows] == [0] and rows[0]["label"] == "sad"
    assert not out.exists()
    monkeypatch.setattr(OmniModel, "recognize_iter", real)
    assert _eval(tiny_ckpt, annotations, out) == 0
    assert [r["index"] for r in _lines(out.with_suffix(".jsonl"))[1:]] == [0, 1, 2, 3]


def test_eval_sigterm_keeps_finished_results_and_exits_143(tiny_ckpt, annotations, tmp_path, capsys, monkeypatch):
    """A real SIGTERM to this process mid-run (a scheduler's stop): the same as Ctrl-C, with its own status."""
    import os
    import signal

    real = OmniModel.recognize_iter
    before = signal.getsignal(signal.SIGTERM)

    def terminated(self, videos, *a, **k):
        for i, r in enumerate(real(self, videos, *a, **k)):
            if i == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            yield r
    monkeypatch.setattr(OmniModel, "recognize_iter", terminated)
    out = tmp_path / "eval.json"
    try:
        assert _eval(tiny_ckpt, annotations, out) == 143
    finally:
        signal.signal(signal.SIGTERM, before)
    err = capsys.readouterr().err
    assert "interrupted" in err and str(out.with_suffix(".jsonl")) in err and "Traceback" not in err
    assert [r["index"] for r in _lines(out.with_suffix(".jsonl"))[1:]] == [0]
    assert not (tmp_path / ".eval.jsonl.lock").exists()  # released


def test_eval_refuses_an_out_another_eval_is_writing_before_loading(tiny_ckpt, annotations, tmp_path, capsys,
                                                                   monkeypatch):
    """Another process holds --out (started as `omni-fast eval` takes it): refused at once, naming --out and the
    process; its results file is not touched."""
    import subprocess
    import sys

    from omni_fast.runlock import lock_path

    out = tmp_path / "eval.json"
    results = out.with_suffix(".jsonl")
    results.write_text('{"omni_fast_eval": 1}\n')
    hold = ("import sys, time\nfrom omni_fast.runlock import RunLock\nlock = RunLock(sys.argv[1], '--out', sys.argv[2])"
            ".acquire()\nprint('held', flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(lock_path(results)), str(out)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(OmniModel, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("model loaded")))
        assert _eval(tiny_ckpt, annotations, out) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"omni-fast eval: error: --out {out} is in use by another omni-fast run: pid "
                              f"{holder.pid} on ") and err.count("\n") == 1
        assert results.read_text() == '{"omni_fast_eval": 1}\n'
    finally:
        holder.kill()
        holder.wait()


def test_eval_refuses_a_results_file_of_another_run_before_loading(tiny_ckpt, annotations, tmp_path, capsys,
                                                                    monkeypatch):
    out = tmp_path / "eval.json"
    assert _eval(tiny_ckpt, annotations, out) == 0
    results = out.with_suffix(".jsonl")
    before = results.read_bytes()
    monkeypatch.setattr(OmniModel, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("model loaded")))
    capsys.readouterr()
    assert _eval(tiny_ckpt, annotations, out, "--max_new_tokens", "5") == 2
    assert "different run (max_new_tokens 4 there, 5 now)" in capsys.readouterr().err
    entries = json.loads(annotations.read_text())
    entries[0]["conversations"][1]["value"] = "happy"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(entries))
    header = json.loads(before.splitlines()[0])
    results.write_bytes(before.replace(json.dumps(header["annotations"]).encode(), json.dumps(str(other)).encode()))
    assert _eval(tiny_ckpt, other, out) == 2
    assert "entry 0 is" in capsys.readouterr().err
    lines = before.splitlines(keepends=True)
    results.write_bytes(lines[0] + b"{broken\n" + b"".join(lines[1:]))
    assert _eval(tiny_ckpt, annotations, out) == 2
    assert "line 2: not a JSON object" in capsys.readouterr().err
    assert results.read_bytes() == lines[0] + b"{broken\n" + b"".join(lines[1:])  # nothing rewritten


def test_eval_resume_with_another_dtype_or_media_backend_is_refused_before_loading(tiny_ckpt, annotations, tmp_path,
                                                                                   capsys, monkeypatch):
    """The header names the resolved load settings: greedy text depends on the dtype and the decoder."""
    out = tmp_path / "eval.json"
    assert _eval(tiny_ckpt, annotations, out) == 0
    before = out.with_suffix(".jsonl").read_bytes()
    monkeypatch.setattr(OmniModel, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("model loaded")))
    capsys.readouterr()
    assert _eval(tiny_ckpt, annotations, out, "--dtype", "bf16") == 2
    assert "dtype 'float32' there, 'bfloat16' now" in capsys.readouterr().err
    assert _eval(tiny_ckpt, annotations, out, "--media_backend", "dali") == 2
    assert "media_backend" in capsys.readouterr().err
    assert out.with_suffix(".jsonl").read_bytes() == before


def test_eval_refuses_bad_out_and_limit_before_loading(tiny_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(OmniModel, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("model loaded")))
    ann = tmp_path / "val.json"
    ann.write_text("[]")
    jsonl = tmp_path / "val.jsonl"
    jsonl.write_text("")
    base = ["eval", "--model_path", str(tiny_ckpt), "--annotations", str(ann)]
    (tmp_path / "adir").mkdir()
    cases = [(["--out", str(ann)], "is one of the inputs"), (["--out", str(tmp_path / "adir")], "is a directory"),
             (["--limit", "0"], "--limit 0"), (["--limit", "-1"], "--limit -1"),
             (["--device", "tpu"], "unknown device 'tpu'"), (["--label_set", ","], "--label_set"),
             (["--max_new_tokens", "0"], "--max_new_tokens 0: expected an integer >= 1"),
             (["--batch_size", "0"], "--batch_size 0: expected an integer >= 1"),
             (["--batch_size", "-3"], "--batch_size -3: expected an integer >= 1"),
             (["--media_workers", "0"], "--media_workers 0: expected an integer >= 1")]
    for extra, message in cases:
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    # the results stream to --out's .jsonl twin: an annotation file of that name is refused too
    assert cli.main(["eval", "--model_path", str(tiny_ckpt), "--annotations", str(jsonl), "--out",
                     str(tmp_path / "val.json")]) == 2
    assert "val.jsonl is one of the inputs" in capsys.readouterr().err
    assert ann.read_text() == "[]" and jsonl.read_text() == ""  # the annotations were not replaced


def test_eval_png_notice_without_matplotlib(tiny_ckpt, annotations, tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "eval.json"
    assert _eval(tiny_ckpt, annotations, out, "--limit", "1") == 0
    err = capsys.readouterr().err
    assert err.count("matplotlib is not installed") == 1
    assert not out.with_suffix(".confusion.png").exists() and out.is_file()


def test_confusion_png_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    from omni_fast.eval import write_confusion_png

    path = write_confusion_png(confusion_matrix(["a", "b"], ["a", "a"]), tmp_path / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_bar_counts_clips_and_shows_the_running_war(omni, clips, monkeypatch):
    from omni_fast import eval as ev

    class Bar:
        def __init__(self):
            self.updates, self.postfix, self.closed = 0, [], False

        def update(self, n):
            self.updates += n

        def set_postfix_str(self, text, refresh=True):
            self.postfix.append(text)

        def close(self):
            self.closed = True
    bar = Bar()
    monkeypatch.setattr(ev, "_progress", lambda total, enabled: bar if enabled else None)
    records = [Record(video=clips["mp4"], label="sad", index=0, source="dfew"),
               Record(video=clips["webm"], label="happy", index=1, source="dfew")]
    report = ev.evaluate(omni, records, max_new_tokens=2, batch_size=1, progress=True)
    assert bar.updates == 2 and bar.closed and len(bar.postfix) == 2
    hits = [r["prediction"] == r["label"] for r in report.rows]
    assert bar.postfix[-1] == f"WAR {100.0 * sum(hits) / 2:.1f}" == f"WAR {report.war:.1f}"


@pytest.mark.slow
def test_eval_sigint_in_a_real_process_keeps_whole_lines(tiny_ckpt, clips, tmp_path):
    """Ctrl-C as a user sends it: SIGINT to a running `omni-fast eval`, which exits 130 without a traceback and
    leaves only whole result lines (a second eval on the same --out meanwhile is refused at once); the same command
    then finishes the rest."""
    import signal
    import subprocess
    import sys
    import time

    entries = [_entry(clips[k], "sad") for k in ("mp4", "mp4_wide", "webm")] * 8
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps(entries))
    out = tmp_path / "eval.json"
    argv = [sys.executable, "-m", "omni_fast.cli", "eval", "--model_path", str(tiny_ckpt), "--annotations", str(ann),
            "--max_new_tokens", "24", "--out", str(out), "--device", "cpu", "--batch_size", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = out.with_suffix(".jsonl")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not results.exists() or results.read_text().count("\n") < 3):
        time.sleep(0.05)
    # a second eval with the same --out meanwhile (the first paused, so that it is surely still running): refused
    # at once, naming the first (both used to write the file)
    proc.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    finally:
        proc.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and second.stderr.startswith(
        f"omni-fast eval: error: --out {out} is in use by another omni-fast run: pid {proc.pid} on "), second.stderr
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    header, *rows = _lines(results)  # json.loads of every line: none is torn
    assert 2 <= len(rows) < len(entries) and [r["index"] for r in rows] == list(range(len(rows)))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["index"] for r in _lines(results)[1:]] == list(range(len(entries)))
    assert _lines(results)[1:len(rows) + 1] == rows


# --- resuming from a results file and its part files -------------------------------------------------------------
def _clip_rows(tmp_path, n=3):
    records = [Record(video=tmp_path / f"c{i}.mp4", label="sad", index=i, source="dfew") for i in range(n)]
    rows = [{"index": r.index, "video": str(r.video), "label": "sad", "prediction": "sad", "text": "ok",
             "source": "dfew"} for r in records]
    return records, rows


def _failed(row):
    return {**row, "prediction": None, "text": "", "finish_reason": "error", "error": "cannot decode"}


def _write(path, header, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in [header, *rows]))


def test_a_stale_error_row_in_a_part_file_never_replaces_a_success(tmp_path):
    """A torchrun job stopped with an error row for clip 1 in a part file; a resumed run recognised clip 1 into
    the results file: whatever the order the files are read in, the success counts and the merge keeps it."""
    from omni_fast.eval import load_done, merge_results, run_header

    records, rows = _clip_rows(tmp_path)
    header = run_header(tmp_path, tmp_path / "val.json", "q", 4)
    results = tmp_path / "eval.jsonl"
    _write(results, header, [rows[0], rows[1]])
    _write(tmp_path / "eval.jsonl.rank0.part", header, [_failed(rows[1]), rows[2]])
    _write(tmp_path / "eval.jsonl.rank1.part", header, [_failed(rows[0])])
    done = load_done(results, header, records)
    assert [done[i].get("error") for i in range(3)] == [None, None, None]
    assert merge_results(results, header) == rows
    assert _lines(results) == [header, *rows] and not list(tmp_path.glob("*.part"))


def test_part_files_are_read_in_rank_order(tmp_path):
    """rank10 after rank2 (not as text sorts them): of two rows for one clip, both errors or both not, the
    higher rank's is the later one."""
    from omni_fast.eval import load_done, merge_results, part_paths, run_header

    records, rows = _clip_rows(tmp_path, 1)
    header = run_header(tmp_path, tmp_path / "val.json", "q", 4)
    results = tmp_path / "eval.jsonl"
    for rank in (10, 2, 1):
        _write(tmp_path / f"eval.jsonl.rank{rank}.part", header, [{**rows[0], "text": f"rank {rank}"}])
    assert [p.name for p in part_paths(results)] == [f"eval.jsonl.rank{r}.part" for r in (1, 2, 10)]
    assert load_done(results, header, records)[0]["text"] == "rank 10"
    assert [r["text"] for r in merge_results(results, header)] == ["rank 10"]


def test_a_resume_with_other_load_settings_is_refused(tmp_path, monkeypatch):
    """dtype, device type, media backend and the BERT / tower overrides change a clip's result: a results file
    written with others is refused, naming the setting and both values; the same settings spelled another way
    (a torch.dtype or its name, cuda:1 or cuda, a relative or absolute path) resume."""
    import re

    import torch

    from omni_fast.eval import ResultsFileError, load_done, run_header

    records, rows = _clip_rows(tmp_path, 1)
    base = (tmp_path, tmp_path / "val.json", "q", 4, "video_audio")
    settings = dict(dtype=torch.float16, device=torch.device("cuda", 1), media_backend="pyav",
                    bert_path=tmp_path / "bert", vision_tower=None, audio_tower=tmp_path / "whisper")
    results = tmp_path / "eval.jsonl"
    _write(results, run_header(*base, **settings), rows)
    header = json.loads(results.read_text().splitlines()[0])
    assert {k: header[k] for k in settings} == {
        "dtype": "float16", "device": "cuda", "media_backend": "pyav", "bert_path": str(tmp_path / "bert"),
        "vision_tower": None, "audio_tower": str(tmp_path / "whisper")}
    monkeypatch.chdir(tmp_path)
    same = dict(settings, dtype="float16", device="cuda", bert_path="bert")
    assert set(load_done(results, run_header(*base, **same), records)) == {0}
    changes = [(dict(dtype=torch.bfloat16), "dtype 'float16' there, 'bfloat16' now"),
               (dict(device="cpu"), "device 'cuda' there, 'cpu' now"),
               (dict(media_backend="dali"), "media_backend 'pyav' there, 'dali' now"),
               (dict(bert_path=None), f"bert_path {str(tmp_path / 'bert')!r} there, None now"),
               (dict(vision_tower=tmp_path / "siglip"), f"vision_tower None there, {str(tmp_path / 'siglip')!r} now"),
               (dict(audio_tower=tmp_path / "w2"), "audio_tower")]
    for change, said in changes:
        with pytest.raises(ResultsFileError, match=re.escape(said)):
            load_done(results, run_header(*base, **{**settings, **change}), records)
