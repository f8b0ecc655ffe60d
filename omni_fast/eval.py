"""Emotion-recognition evaluation as R1-Omni reports it: WAR and UAR over DFEW / MAFW / RAVDESS annotations.

    WAR  weighted average recall = sum_c (n_c / N) * recall_c = accuracy over the ground-truth classes
    UAR  unweighted average recall = mean of recall_c over the classes present in the ground truth
(humanomni/eval/eval_mafw_dfew.py: recall_score(average=None, labels=unique(y_true)), x 100.)

The reference scripts compare the whole response with the label; R1-Omni answers "<think>...</think>
<answer>label</answer>", so the prediction here is the text inside the first <answer></answer> (the whole
stripped response when there is none), compared exactly, case-sensitively, as the accuracy reward does.
RAVDESS labels are renamed as eval_ravedess.py does (fearful -> fear, surprised -> surprise).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from omni_fast.grpo.data import RAVDESS_LABELS, Record


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


def prediction(response: str) -> str:
    """The label a response gives: inside its first <answer></answer>, else the whole stripped response."""
    from omni_fast.api import parse_response

    answer = parse_response(response)[1]
    return answer if answer is not None else response.strip()


def ground_truth(record: Record) -> str:
    label = record.label.strip()
    return RAVDESS_LABELS.get(label, label) if record.source == "ravdess" else label


@dataclass(slots=True)
class EvalReport:
    war: float  # percent, over every scored clip
    uar: float  # percent
    by_source: dict[str, dict[str, float]]  # source -> {"war", "uar", "clips"}
    recall: dict[str, float]  # per ground-truth class, over every scored clip
    rows: list[dict] = field(default_factory=list)  # per clip: gt, prediction, response, source, video_path
    skipped: list[dict] = field(default_factory=list)  # clips that could not be decoded: path, error

    def as_dict(self) -> dict:
        return {"war": self.war, "uar": self.uar, "by_source": self.by_source, "recall": self.recall,
                "clips": len(self.rows), "skipped": self.skipped}


def score(rows: list[dict], skipped: list[dict] | None = None) -> EvalReport:
    """rows with 'gt', 'prediction' and 'source' -> the report (overall and per source)."""
    y_true, y_pred = [r["gt"] for r in rows], [r["prediction"] for r in rows]
    war, uar = war_uar(y_true, y_pred)
    by_source = {}
    for source in sorted({r["source"] for r in rows}):
        part = [r for r in rows if r["source"] == source]
        w, u = war_uar([r["gt"] for r in part], [r["prediction"] for r in part])
        by_source[source] = {"war": w, "uar": u, "clips": len(part)}
    return EvalReport(war=war, uar=uar, by_source=by_source, recall=per_class_recall(y_true, y_pred), rows=rows,
                      skipped=skipped or [])


def recognize_rows(model, records: list[Record], instruct: str | None = None, max_new_tokens: int = 1024,
                   batch_size: int = 8) -> tuple[list[dict], list[dict]]:
    """Greedy recognition of every record's clip -> (per-clip rows in record order, skipped clips)."""
    results = model.recognize(records, instruct, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              on_error="skip")
    failed = {f.index for f in model.failures}
    kept = [r for i, r in enumerate(records) if i not in failed]  # results come in record order, skips removed
    assert len(kept) == len(results), (len(kept), len(results))
    rows = [{"index": record.index, "gt": ground_truth(record), "prediction": prediction(res.text),
             "response": res.text, "source": record.source, "video_path": res.video}
            for record, res in zip(kept, results)]
    return rows, [{"path": f.path, "error": f.error} for f in model.failures]


def evaluate(model, records: list[Record], instruct: str | None = None, max_new_tokens: int = 1024,
             batch_size: int = 8, dist_ctx=None) -> EvalReport | None:
    """Greedy recognition of every record's clip (clips that cannot be decoded are skipped and reported).

    Under torchrun (dist_ctx from omni_fast.distributed.init), rank r recognises records r, r + W, r + 2W, ...;
    rank 0 merges the rows in record order and scores them once (the other ranks get None)."""
    world, rank = (dist_ctx.world_size, dist_ctx.rank) if dist_ctx is not None else (1, 0)
    rows, skipped = recognize_rows(model, records[rank::world], instruct, max_new_tokens, batch_size)
    if world > 1:
        from omni_fast import distributed

        shards = distributed.all_gather_objects(dist_ctx, (rows, skipped))
        if rank != 0:
            return None
        rows = sorted((row for s in shards for row in s[0]), key=lambda row: row["index"])  # record order
        skipped = [x for s in shards for x in s[1]]
    if not rows:
        raise ValueError(f"none of the {len(records)} clips could be decoded (first error: "
                         f"{skipped[0]['error'] if skipped else 'none'})")
    return score(rows, skipped)


def write_json(path: str | Path, payload) -> Path:
    """Write JSON through a temporary file and a rename: a results file is never left half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    os.replace(tmp, path)
    return path
