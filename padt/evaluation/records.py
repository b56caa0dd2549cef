"""Prediction records and the append-only per-rank JSONL store that makes an evaluation resumable.

Each rank appends one line per sample to ``predictions.rank{r}.jsonl`` as soon as its batch is generated (and
flushed), keyed by the sample index. On restart every rank reads the indices already present in *all* rank files
(so a restart with another number of processes still skips them), drops a torn last line of its own file (a run
killed mid-write), and appends the rest. The metrics step merges the files by index.

A record: ``{"index", "id", "image", "text", "image_size": [W, H], "objects": [{"label", "vrt_ids", "box_xyxy"
(pixels, clipped), "box_cxcywh" (normalised, as decoded), "score", "mask_rle" (COCO RLE or null)}]}``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from padt.evaluation.data import EvalSample

RANK_FILE = "predictions.rank{rank}.jsonl"
_RANK_FILE_RE = re.compile(r"^predictions\.rank(\d+)\.jsonl$")


def prediction_record(sample: EvalSample, pred) -> dict:
    """JSON-ready record of one `padt.inference.predictor.Prediction` (duck-typed: text, objects, image_size)."""
    from padt.geometry.masks import rle_encode

    return {
        "index": sample.index,
        "id": sample.record.get("id"),
        "image": sample.record["image"],
        "text": pred.text,
        "image_size": [int(v) for v in pred.image_size],
        "objects": [
            {
                "label": obj.label,
                "vrt_ids": [int(v) for v in obj.vrt_ids],
                "box_xyxy": [float(v) for v in obj.box_xyxy],
                "box_cxcywh": [float(v) for v in obj.box_cxcywh],
                "score": float(obj.score),
                "mask_rle": rle_encode(obj.mask) if obj.mask is not None else None,
            }
            for obj in pred.objects
        ],
    }


def _complete_lines(path: Path) -> tuple[list[bytes], int]:
    """The complete (newline-terminated) lines of a file and the byte length they cover."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    return data[:end].splitlines(), end


def _parse(line: bytes, path: Path, lineno: int) -> dict:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed prediction line {lineno} in {path}: {err.msg}; delete the line (or the file) to "
                         "regenerate those predictions") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("index"), int):
        raise ValueError(f"prediction line {lineno} in {path} has no integer 'index'")  # noqa: TRY004 (bad file)
    return rec


def rank_files(directory: str | os.PathLike) -> list[Path]:
    """The ``predictions.rank{r}.jsonl`` files of a directory, by rank."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _RANK_FILE_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def read_predictions(directory: str | os.PathLike) -> dict[int, dict]:
    """Merge every rank file: index -> record (the first one wins if a sample was predicted twice). A torn last
    line (a killed writer) is ignored."""
    merged: dict[int, dict] = {}
    for path in rank_files(directory):
        lines, _ = _complete_lines(path)
        for lineno, line in enumerate(lines, start=1):
            if line.strip():
                rec = _parse(line, path, lineno)
                merged.setdefault(rec["index"], rec)
    return merged


class PredictionStore:
    """One rank's append-only prediction file in `directory`."""

    def __init__(self, directory: str | os.PathLike, rank: int = 0):
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.directory = Path(directory)
        self.rank = rank
        self.path = self.directory / RANK_FILE.format(rank=rank)

    def repair(self) -> int:
        """Cut a torn last line (no newline: the previous run was killed while writing it); returns bytes removed."""
        if not self.path.exists():
            return 0
        size = self.path.stat().st_size
        _, end = _complete_lines(self.path)
        if end < size:
            with open(self.path, "r+b") as f:
                f.truncate(end)
            print(f"[padt.eval] {self.path}: removed a torn last line ({size - end} bytes) left by an interrupted run",
                  file=sys.stderr)
        return size - end

    def done_indices(self) -> set[int]:
        """Sample indices predicted so far by any rank."""
        return set(read_predictions(self.directory))

    def append(self, records: list[dict]) -> None:
        """Append records (one JSON line each) and flush them to the OS, so that a kill loses at most this call."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8", newline="\n") as f:
            f.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
