"""Annotation files of R1-Omni / HumanOmni (docs/REFERENCE.md §5) read into records the media loader takes.

Two formats, told apart per entry:
  conversations  train/val (DFEW, MAFW, EMER): {"video": path, "conversations": [{"from": "human", "value": q},
                 {"from": "gpt", "value": "sad" | "<think>...</think>\\n<answer>sad</answer>"}], ...}
  RAVDESS        {"ori_path": path, "QA_question": "...Answer:<label>", ...}
A file holds a JSON list of entries (a JSON object with one list under "data" or "annotations" is accepted
too), or one entry per line (.jsonl). Paths are resolved against `data_root` (default: the file's folder);
absolute paths are kept. A bad entry is an AnnotationError naming the file and the entry's index.

source follows the reference eval's grouping: "mafw" if "MAFW" is in the video path, else "dfew" for the
conversation format; "ravdess" for the RAVDESS format. Labels are kept as written (stripped); the RAVDESS
eval's renames (fearful -> fear, surprised -> surprise) are the task's (omni_fast.task.dataset_label), applied by
the eval.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omni_fast import task
SIDECAR_AUDIO = (".wav", ".flac", ".ogg")  # formats DALI's audio decoder reads
NO_SUCH_CLIP = "no such clip"  # the end of a BadEntry's reason when its clip does not exist


class AnnotationError(ValueError):
    """An annotation file or entry that cannot be read; the message names the file and the entry index."""


@dataclass(slots=True)
class Record:
    video: Path  # the clip, resolved against the data root
    label: str  # ground-truth emotion as written ("sad"); for <answer> targets, the text inside the tag
    index: int  # position of the entry in its annotation file
    source: str  # "dfew" | "mafw" | "ravdess" (the reference eval's grouping)
    question: str | None = None  # the human turn (the RL recipe ignores it and uses a fixed prompt)
    target: str | None = None  # the gpt turn verbatim (SFT targets carry <think>...</think>)
    audio: Path | None = None  # a separate audio file for the clip; None: the clip's own audio track
    extra: dict[str, Any] = field(default_factory=dict)  # the entry's other keys, untouched


def load_annotations(path: str | Path, data_root: str | Path | None = None,
                     errors: list[BadEntry] | None = None) -> list[Record]:
    """Read an annotation file (.json list or .jsonl) into Records; see the module docstring. A malformed entry
    raises its AnnotationError, or, when an `errors` list is given, is appended to it and left out."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: no such annotation file")
    root = Path(data_root) if data_root is not None else path.parent
    records = []
    for i, entry in enumerate(_entries(path)):
        try:
            records.append(parse_entry(entry, i, root, path))
        except AnnotationError as e:
            if errors is None:
                raise
            where = str(entry.get("video", entry.get("ori_path", "?"))) if isinstance(entry, dict) else "?"
            errors.append(BadEntry(index=i, path=where, reason=str(e).removeprefix(f"{path}: entry {i}: ")))
    return records


@dataclass(slots=True)
class BadEntry:
    index: int  # the entry's position in its annotation file
    path: str  # the clip it names
    reason: str  # what is wrong with it


def missing_clips_hint(bad: list[BadEntry], total: int, data_root: str | Path | None,
                       annotations: str | Path) -> str | None:
    """The likely cause when most entries name clips that do not exist: a wrong data root (video_root). None
    when fewer than half of the `total` entries do."""
    missing = [b for b in bad if b.reason.endswith(NO_SUCH_CLIP)]
    if not missing or 2 * len(missing) < total:
        return None
    root = f"video_root {data_root}" if data_root is not None else \
        f"the annotation file's folder {Path(annotations).parent} (video_root is not set)"
    return (f"{len(missing)} of {total} entries name clips that do not exist (e.g. {missing[0].path}); relative "
            f"clip paths are resolved against {root}: is that where the clips are?")


def check_records(records: list[Record], label_set: tuple[str, ...] | None = None,
                  need_target: bool = False) -> tuple[list[Record], list[BadEntry]]:
    """Split records into usable ones and BadEntry's: a clip file that does not exist, a label outside
    `label_set`, or (need_target, for SFT) no assistant turn to learn. Undecodable clips are found later, by
    the media loader, when they are decoded."""
    good, bad = [], []
    allowed = set(label_set) if label_set is not None else None
    for r in records:
        reason = None
        if not r.video.is_file():
            reason = f"{r.video}: {NO_SUCH_CLIP}"
        elif r.audio is not None and not r.audio.is_file():
            reason = f"{r.audio}: no such audio file"
        elif allowed is not None and r.label not in allowed:
            reason = f"label {r.label!r} is not in the label set {sorted(allowed)}"
        elif need_target and not r.target:
            reason = "no assistant ('gpt') turn to train on"
        if reason is None:
            good.append(r)
        else:
            bad.append(BadEntry(index=r.index, path=str(r.video), reason=reason))
    return good, bad


def _entries(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        lists = [data[k] for k in ("data", "annotations") if isinstance(data.get(k), list)]
        if not lists:
            raise AnnotationError(f"{path}: expected a JSON list of entries (or an object with a 'data' list)")
        data = lists[0]
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    return data


def parse_entry(entry: Any, index: int, root: Path, source_file: Path | str = "<annotations>") -> Record:
    """One annotation entry -> Record; AnnotationError naming the file and index on anything malformed."""
    where = f"{source_file}: entry {index}"
    if not isinstance(entry, dict):
        raise AnnotationError(f"{where}: expected an object, got {type(entry).__name__}")
    if "conversations" in entry:
        return _conversation_record(entry, index, root, where)
    if "QA_question" in entry:
        return _ravdess_record(entry, index, root, where)
    raise AnnotationError(f"{where}: neither the conversation format ('video' + 'conversations') nor the "
                          f"RAVDESS format ('ori_path' + 'QA_question'); keys: {sorted(entry)}")


def _conversation_record(entry: dict, index: int, root: Path, where: str) -> Record:
    video = _path(entry, "video", root, where)
    turns = entry["conversations"]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise AnnotationError(f"{where}: 'conversations' must be a list of {{from, value}} objects")
    human = [t.get("value") for t in turns if t.get("from") == "human"]
    gpt = [t.get("value") for t in turns if t.get("from") == "gpt"]
    if not gpt or not isinstance(gpt[0], str) or not gpt[0].strip():
        raise AnnotationError(f"{where}: no non-empty 'gpt' turn to take the label from")
    label = task.label_of(gpt[0])
    if not label:
        raise AnnotationError(f"{where}: the <answer> tag of the 'gpt' turn is empty")
    source = "mafw" if "MAFW" in str(entry["video"]) else "dfew"
    extra = {k: v for k, v in entry.items() if k not in ("video", "conversations")}
    return Record(video=video, label=label, index=index, source=source,
                  question=human[0] if human and isinstance(human[0], str) else None, target=gpt[0], extra=extra)


def _ravdess_record(entry: dict, index: int, root: Path, where: str) -> Record:
    video = _path(entry, "ori_path", root, where)
    qa = entry["QA_question"]
    if not isinstance(qa, str) or "Answer:" not in qa:
        raise AnnotationError(f"{where}: 'QA_question' must be a string ending in 'Answer:<label>'")
    label = qa.split("Answer:")[-1].strip()
    if not label:
        raise AnnotationError(f"{where}: 'QA_question' has an empty label after 'Answer:'")
    extra = {k: v for k, v in entry.items() if k not in ("ori_path", "QA_question")}
    return Record(video=video, label=label, index=index, source="ravdess", question=qa.split("Answer:")[0].strip(),
                  extra=extra)


def _path(entry: dict, key: str, root: Path, where: str) -> Path:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise AnnotationError(f"{where}: missing or empty {key!r} (the clip's path)")
    p = Path(value.strip())
    return p if p.is_absolute() else root / p


def with_sidecar_audio(records: list[Record], suffixes: tuple[str, ...] = SIDECAR_AUDIO) -> list[Record]:
    """Set `audio` to a file beside the clip with the same stem and one of `suffixes`, where one exists (the
    first in `suffixes` order); records that already name an audio file are kept as they are."""
    for r in records:
        if r.audio is None:
            r.audio = next((c for c in (r.video.with_suffix(s) for s in suffixes) if c.is_file()), None)
    return records
