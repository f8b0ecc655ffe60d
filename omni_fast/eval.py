"""Emotion-recognition evaluation as R1-Omni reports it: WAR and UAR over DFEW / MAFW / RAVDESS annotations.

    WAR  weighted average recall = sum_c (n_c / N) * recall_c = accuracy over the ground-truth classes
    UAR  unweighted average recall = mean of recall_c over the classes present in the ground truth
(humanomni/eval/eval_mafw_dfew.py: recall_score(average=None, labels=unique(y_true)), x 100.)

The reference scripts compare the whole response with the label; R1-Omni answers "<think>...</think>
<answer>label</answer>", so the prediction here is the text inside the first <answer></answer> (the whole
stripped response when there is none, counted as unparsable), compared exactly, case-sensitively, as the
accuracy reward does. RAVDESS labels are renamed as eval_ravedess.py does (fearful -> fear, surprised -> surprise).

Ground-truth labels outside their dataset's label set (LABEL_SETS: DFEW's 7, MAFW's 11, RAVDESS's 8) are logged,
counted and left out of WAR / UAR rather than scored as classes of their own; an annotation file none of whose
labels is in its dataset's set is a dataset of its own, scored over the labels it has.

Results are never lost: each clip's row is appended to a JSONL file as soon as it is recognised (flushed and
fsynced), after a first header line naming the run (model, instruct, max_new_tokens, modal, dtype, device type,
media backend, BERT / tower overrides). Running the same evaluation again reads the file, checks it belongs to
this run and these annotation entries, and recognises only the clips not in it yet (a half-written last line,
from a crash, is dropped); clips that failed to decode are tried again. Under torchrun each rank appends to its
own part file, `<results>.rank<R>.part`, and rank 0 merges the parts into the results file, in record order,
once every rank is done. Where files hold several rows of a clip, one without an error beats one with, whatever
the order; otherwise the later one counts (the results file, then the parts by rank).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from omni_fast import task
from omni_fast.atomic import atomic_write, write_text
from omni_fast.data import Record
from omni_fast.task import LABEL_SETS

log = logging.getLogger(__name__)

RESULTS_FORMAT = 1  # the header's "omni_fast_eval" value
# The settings that change a clip's result: a results file written with others cannot be resumed.
RUN_KEYS = ("model_path", "instruct", "max_new_tokens", "modal", "dtype", "device", "media_backend", "bert_path",
            "vision_tower", "audio_tower")
OTHER = "other"  # the confusion matrix's column for predictions outside the classes


class ResultsFileError(ValueError):
    """A results file that cannot be resumed: written by another run, for other annotations, or corrupt."""


# --- metrics -----------------------------------------------------------------------------------------------------
def war_uar(y_true: list[str], y_pred: list[str]) -> tuple[float, float]:
    """(WAR, UAR) in percent; classes are those present in y_true."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    if not y_true:
        raise ValueError("no labels to score")
    recalls = per_class_recall(y_true, y_pred)
    counts = Counter(y_true)
    war = sum(counts[c] / len(y_true) * r for c, r in recalls.items())
    return 100.0 * war, 100.0 * sum(recalls.values()) / len(recalls)


def per_class_recall(y_true: list[str], y_pred: list[str]) -> dict[str, float]:
    hits, counts = Counter(), Counter(y_true)
    for t, p in zip(y_true, y_pred):
        hits[t] += t == p
    return {c: hits[c] / counts[c] for c in sorted(counts)}


def confusion_matrix(y_true: list[str], y_pred: list[str]) -> dict:
    """Rows: the ground-truth classes (sorted); columns: the same classes then OTHER (any other prediction)."""
    labels = sorted(set(y_true))
    column = {c: i for i, c in enumerate(labels)}
    matrix = [[0] * (len(labels) + 1) for _ in labels]
    for t, p in zip(y_true, y_pred):
        matrix[column[t]][column.get(p, len(labels))] += 1
    return {"labels": labels, "columns": [*labels, OTHER], "matrix": matrix}


def prediction(response: str) -> str:
    """The label a response gives: inside its first <answer></answer>, else the whole stripped response."""
    return task.label_of(response)


def ground_truth(record: Record) -> str:
    return task.dataset_label(record.label, record.source)


def label_sets_for(records: Iterable[Record]) -> dict[str, tuple[str, ...]] | None:
    """Each source's dataset label set, or None (every label is a class) when no record's label is in its
    source's set: then the file is another dataset, such as a custom one, and has its own labels."""
    records = list(records)
    if any(ground_truth(r) in LABEL_SETS.get(r.source, ()) for r in records):
        return LABEL_SETS
    return None


# --- the report --------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class EvalReport:
    war: float  # percent, over every scored clip
    uar: float  # percent
    by_source: dict[str, dict[str, float]]  # source -> {"war", "uar", "clips"}
    recall: dict[str, float]  # per ground-truth class, over every scored clip
    clips: int = 0  # clips scored (recognised, with a label in the label set)
    confusion: dict = field(default_factory=dict)  # confusion_matrix() over every scored clip
    unparsable: int = 0  # scored responses without an <answer></answer> (the whole text was compared)
    outside_label_set: dict[str, int] = field(default_factory=dict)  # label -> clips left out of the scores
    rows: list[dict] = field(default_factory=list)  # per clip, see result_row()
    skipped: list[dict] = field(default_factory=list)  # clips that could not be decoded: path, error
    tower_cache: dict | None = None  # with a tower-feature store: this run's clips read from it ("hits") and
    # computed by the towers ("misses"); None without one

    def as_dict(self) -> dict:
        out = {"war": self.war, "uar": self.uar, "clips": self.clips, "by_source": self.by_source,
               "recall": self.recall, "confusion": self.confusion, "unparsable": self.unparsable,
               "outside_label_set": self.outside_label_set, "skipped": self.skipped}
        return out if self.tower_cache is None else {**out, "tower_cache": self.tower_cache}


def _outside(rows: list[dict], label_sets: dict[str, tuple[str, ...]] | None) -> list[dict]:
    if label_sets is None:
        return []
    return [r for r in rows if r["source"] in label_sets and r["label"] not in label_sets[r["source"]]]


def score(rows: list[dict], skipped: list[dict] | None = None,
          label_sets: dict[str, tuple[str, ...]] | None = None) -> EvalReport:
    """rows with 'label', 'prediction', 'source' (and 'text') -> the report, overall and per source. Rows with
    an 'error' are skipped clips; rows whose label is outside their source's label set are counted, logged and
    left out of the scores."""
    done = [r for r in rows if r.get("error") is None]
    outside = _outside(done, label_sets)
    counts = Counter(r["label"] for r in outside)
    for label, n in sorted(counts.items()):
        sources = sorted({r["source"] for r in outside if r["label"] == label})
        log.warning("%d clip(s) labelled %r, not a label of %s: left out of WAR / UAR", n, label, "/".join(sources))
    ids = {id(r) for r in outside}
    scored = [r for r in done if id(r) not in ids]
    if not scored:
        raise ValueError(f"no clip to score: {len(rows)} results, {len(rows) - len(done)} skipped, "
                         f"{len(outside)} with labels outside the label set")
    y_true, y_pred = [r["label"] for r in scored], [r["prediction"] for r in scored]
    war, uar = war_uar(y_true, y_pred)
    by_source = {}
    for source in sorted({r["source"] for r in scored}):
        part = [r for r in scored if r["source"] == source]
        w, u = war_uar([r["label"] for r in part], [r["prediction"] for r in part])
        by_source[source] = {"war": w, "uar": u, "clips": len(part)}
    unparsable = sum(task.answer(r.get("text", "")) is None for r in scored)
    return EvalReport(war=war, uar=uar, by_source=by_source, recall=per_class_recall(y_true, y_pred),
                      clips=len(scored), confusion=confusion_matrix(y_true, y_pred), unparsable=unparsable,
                      outside_label_set=dict(sorted(counts.items())), rows=rows,
                      skipped=[{"path": r["video"], "error": r["error"]} for r in rows if r.get("error") is not None]
                      if skipped is None else skipped)


# --- the results file --------------------------------------------------------------------------------------------
def _absolute(path: str | Path | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def run_header(model_path: str | Path, annotations: str | Path, instruct: str, max_new_tokens: int,
               modal: str = "video_audio", *, dtype=None, device=None, media_backend: str | None = None,
               bert_path: str | Path | None = None, vision_tower: str | Path | None = None,
               audio_tower: str | Path | None = None) -> dict:
    """The results file's first line: what produced it (RUN_KEYS must match for a resume). dtype and device are
    the ones the model loads with once resolved (omni_fast.api.load_settings), kept as the dtype's name and the
    device type, so "cuda:1" and "cuda" or torch.float16 and "float16" are one run; the BERT / tower overrides
    as absolute paths (None: the checkpoint's own). None where a caller does not say."""
    return {"omni_fast_eval": RESULTS_FORMAT, "model_path": _absolute(model_path),
            "annotations": _absolute(annotations), "instruct": instruct, "max_new_tokens": max_new_tokens,
            "modal": modal, "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
            "device": None if device is None else str(device).partition(":")[0], "media_backend": media_backend,
            "bert_path": _absolute(bert_path), "vision_tower": _absolute(vision_tower),
            "audio_tower": _absolute(audio_tower)}


def _clip_path(record: Record) -> str:
    """The clip as an absolute path: a results file stays checkable from another working directory."""
    return os.path.abspath(record.video)


def result_row(record: Record, res) -> dict:
    """One clip's line: index, video, label, prediction, reasoning, text, finish_reason, seconds, source,
    features_from ("towers" or "store": where its tower features came from), and error, for a clip that could
    not be decoded."""
    row = {"index": record.index, "video": _clip_path(record), "label": ground_truth(record),
           "prediction": prediction(res.text) if res.error is None else None, "reasoning": res.reasoning,
           "text": res.text, "finish_reason": res.finish_reason, "seconds": round(res.timings.total, 4),
           "source": record.source}
    if res.error is not None:
        row["error"] = res.error
    else:
        row["features_from"] = res.features_from
    return row


def _rank(part: Path, results: Path) -> tuple[int, str]:
    rank = part.name.removeprefix(f"{results.name}.rank").removesuffix(".part")
    return (int(rank), "") if rank.isdigit() else (sys.maxsize, rank)


def part_paths(results: Path) -> list[Path]:
    """The per-rank part files of a results file (from this run or an interrupted one under torchrun), by rank
    (rank10 after rank2)."""
    return sorted(results.parent.glob(f"{results.name}.rank*.part"), key=lambda p: _rank(p, results))


def merge_rows(files: Iterable[list[dict]]) -> dict[int, dict]:
    """Rows of several files, in reading order -> index -> the row that counts: a later row replaces an earlier
    one unless it has an error and the earlier one has not (an error row a stopped torchrun job left in a part
    file never hides the success a resumed run wrote)."""
    kept: dict[int, dict] = {}
    for rows in files:
        for row in rows:
            earlier = kept.get(row["index"])
            if earlier is None or row.get("error") is None or earlier.get("error") is not None:
                kept[row["index"]] = row
    return kept


def read_results(path: Path) -> tuple[dict | None, list[dict], int]:
    """-> (header, rows, byte length of the complete lines). A last line without its newline (a write cut by a
    crash) is dropped; any other line that is not JSON is a ResultsFileError naming it."""
    if not path.is_file():
        return None, [], 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # the complete lines; a torn tail after them is ignored
    lines = data[:end].decode("utf-8").splitlines()
    if end < len(data):
        log.warning("%s: dropping a half-written last line (%d bytes) left by an interrupted run", path,
                    len(data) - end)
    parsed = []
    for number, line in enumerate(lines, 1):
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ResultsFileError(f"{path} line {number}: not a JSON object ({e}); pass --overwrite to start "
                                   "over, or another --out") from None
    if not parsed:
        return None, [], end
    header = parsed[0]
    if not isinstance(header, dict) or header.get("omni_fast_eval") != RESULTS_FORMAT:
        raise ResultsFileError(f"{path}: not an omni-fast eval results file (no header line); pass --overwrite "
                               "to replace it, or another --out")
    return header, parsed[1:], end


def check_run(path: Path, found: dict, expected: dict) -> None:
    """The file's header against this run's: the settings that change results must be the same."""
    diff = [f"{k} {found.get(k)!r} there, {expected[k]!r} now" for k in RUN_KEYS if found.get(k) != expected[k]]
    if diff:
        raise ResultsFileError(f"{path} was written by a different run ({'; '.join(diff)}): pass --overwrite to "
                               "start over, or another --out")


def check_entries(path: Path, rows: list[dict], records: list[Record]) -> None:
    """Every row of the file must be the annotation entry of the same index (same clip, same label)."""
    by_index = {r.index: r for r in records}
    for row in rows:
        record = by_index.get(row.get("index"))
        if record is None:
            continue  # beyond this run's --limit: kept, not scored
        if row.get("video") != _clip_path(record) or row.get("label") != ground_truth(record):
            raise ResultsFileError(
                f"{path}: entry {row.get('index')} is {row.get('video')!r} labelled {row.get('label')!r} there but "
                f"{_clip_path(record)!r} labelled {ground_truth(record)!r} in the annotations: the file belongs to "
                "other annotations; pass --overwrite to start over, or another --out")


def load_done(results: Path, header: dict, records: list[Record]) -> dict[int, dict]:
    """The rows already in the results file and its part files, checked against this run (index -> row, as
    merge_rows picks them, so a clip that failed before and succeeded later counts once, as a success)."""
    files = []
    for path in [results, *part_paths(results)]:
        found, rows, _ = read_results(path)
        if found is None:
            continue
        check_run(path, found, header)
        check_entries(path, rows, records)
        files.append(rows)
    return merge_rows(files)


class ResultsWriter:
    """Appends one JSON line per clip (the file is opened for appending), flushed and fsynced, so a crash or
    Ctrl-C loses no finished result; a half-written last line left by an earlier crash is cut off before the
    first append."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        found, _, end = read_results(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size > end:
            os.truncate(path, end)
        self.file = open(path, "ab")
        if found is None:
            self.write(header)

    def write(self, row: dict) -> None:
        self.file.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge_results(results: Path, header: dict) -> list[dict]:
    """The results file and its part files -> one results file in record order (written through a temporary
    file and a rename), the parts removed; returns its rows (one per clip, as merge_rows picks them)."""
    rows = merge_rows(read_results(path)[1] for path in [results, *part_paths(results)])
    merged = [rows[i] for i in sorted(rows)]
    with atomic_write(results, "wb", fsync=True) as f:
        for row in [header, *merged]:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    for part in part_paths(results):
        part.unlink()
    return merged


def remove_results(results: Path) -> None:
    """--overwrite: the results file and its part files go before anything is recognised."""
    for path in [results, *part_paths(results)]:
        path.unlink(missing_ok=True)


# --- running -----------------------------------------------------------------------------------------------------
def _progress(total: int, enabled: bool):
    """A tqdm bar on stderr (clips/s and ETA are tqdm's; running WAR is set as its postfix), or None."""
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="clip", file=sys.stderr, dynamic_ncols=True, disable=None)


def recognize_into(model, records: list[Record], writer: ResultsWriter | None, instruct: str,
                   max_new_tokens: int, batch_size: int, modal: str = "video_audio",
                   progress: bool = False, label_sets=None) -> list[dict]:
    """Recognise `records`, writing each clip's row as soon as it is done -> the rows, in record order."""
    rows, hits, scored = [], 0, 0
    bar = _progress(len(records), progress)
    try:
        for res in model.recognize_iter(records, instruct, modal, max_new_tokens, batch_size, on_error="skip"):
            row = result_row(records[res.index], res)
            if writer is not None:
                writer.write(row)
            rows.append(row)
            if row.get("error") is None and not _outside([row], label_sets):
                scored += 1
                hits += row["prediction"] == row["label"]
            if bar is not None:
                bar.set_postfix_str(f"WAR {100.0 * hits / max(1, scored):.1f}", refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return rows


def evaluate(model, records: list[Record], instruct: str | None = None, max_new_tokens: int = 2048,
             batch_size: int = 8, dist_ctx=None, *, results: str | Path | None = None, header: dict | None = None,
             overwrite: bool = False, modal: str = "video_audio", progress: bool = False,
             label_sets: dict | str | None = "auto") -> EvalReport | None:
    """Greedy recognition of every record's clip (default prompt: the reference eval's EVAL_QUESTION), scored.

    results: the JSONL file each clip's row is appended to as it finishes (see the module docstring); a rerun
    with the same file recognises only what is missing, overwrite=True starts over. header: run_header() of this
    run (required with results). label_sets: "auto" (label_sets_for the records), None (every label is a
    class) or a dict source -> labels. Under torchrun (dist_ctx from omni_fast.distributed.init), rank r
    recognises every W-th clip still to do; rank 0 merges and scores (the other ranks get None)."""
    from omni_fast import distributed

    instruct = task.EVAL_QUESTION if instruct is None else instruct
    world, rank = (dist_ctx.world_size, dist_ctx.rank) if dist_ctx is not None else (1, 0)
    label_sets = label_sets_for(records) if label_sets == "auto" else label_sets
    path = Path(results) if results is not None else None
    done: dict[int, dict] = {}
    if path is not None:
        if header is None:
            raise ValueError("evaluate(results=...) needs the run's header (omni_fast.eval.run_header)")
        if overwrite and rank == 0:
            remove_results(path)
        if world > 1:
            distributed.barrier(dist_ctx)  # no rank reads what rank 0 is removing
        if not overwrite:
            done = load_done(path, header, records)
        if world > 1:
            distributed.barrier(dist_ctx)  # every rank has read the same files before any rank appends to them
    todo = [r for r in records if r.index not in done or done[r.index].get("error") is not None]
    if done and rank == 0:
        log.info("%s: %d of %d clips already done, recognising the other %d", path, len(records) - len(todo),
                 len(records), len(todo))
    mine = todo[rank::world]
    writer = None
    if path is not None:
        writer = ResultsWriter(path if world == 1 else path.with_name(f"{path.name}.rank{rank}.part"), header)
    try:
        new = recognize_into(model, mine, writer, instruct, max_new_tokens, batch_size, modal,
                             progress and rank == 0, label_sets) if mine else []
    finally:
        if writer is not None:
            writer.close()
    if world > 1:
        shards = distributed.all_gather_objects(dist_ctx, new)  # also: every rank has finished writing
        if rank != 0:
            return None
        new = [row for shard in shards for row in shard]
    if path is not None:
        rows = merge_results(path, header)
    else:
        rows = sorted({**done, **{row["index"]: row for row in new}}.values(), key=lambda row: row["index"])
    wanted = {r.index for r in records}
    rows = [row for row in rows if row["index"] in wanted]
    if not any(row.get("error") is None for row in rows):
        errors = [row["error"] for row in rows if row.get("error")]
        raise ValueError(f"none of the {len(records)} clips could be decoded (first error: "
                         f"{errors[0] if errors else 'none'})")
    report = score(rows, label_sets=label_sets)
    if getattr(model, "tower_cache_dir", None) is not None:
        sources = Counter(row.get("features_from") for row in new)
        report.tower_cache = {"hits": sources["store"], "misses": sources["towers"]}
    return report


# --- writing the summary -----------------------------------------------------------------------------------------
def write_json(path: str | Path, payload) -> Path:
    """Write JSON through a temporary file and a rename: a results file is never left half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, json.dumps(payload, indent=2, ensure_ascii=False))


def write_confusion_png(confusion: dict, path: str | Path) -> Path | None:
    """The confusion matrix as a PNG (counts, rows normalised to recall for the colour) where matplotlib is
    installed; otherwise one logged line and None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no confusion-matrix PNG (pip install matplotlib)")
        return None
    labels, columns, matrix = confusion["labels"], confusion["columns"], confusion["matrix"]
    rates = [[v / max(1, sum(row)) for v in row] for row in matrix]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(columns), 1.0 + 0.6 * len(labels)))
    ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if rates[i][j] > 0.5 else "black")
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return path
