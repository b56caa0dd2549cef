"""Reading the released PaDT JSONL records from local files or the dataset hub, and mixing several files.

The record format is described in docs/preprocessing.md ("Output: one JSON object per line").

A *record* is one JSON object per line::

    {"id": 9, "image": "000000000009.jpg", "conversations": [{"from": "human", "value": PROMPT}],
     "answer_template": "There is 1 \\"cat\\" (<|Obj_0|>) in this image.",
     "objects": [{"patches": [...], "bbox": [x1, y1, x2, y2], "iscrowd": 0, "area": 1.0, "rle": {...},
                  "label": "cat"}],
     "task": "ovd"}

Required: ``image`` (str), ``conversations`` (first entry has a str ``value``), ``answer_template`` (str),
``objects`` (list; each with a normalised ``bbox`` of 4 numbers; ``rle``, ``patches``, ``label`` optional), ``task``
(str). Every ``<|Obj_k|>`` of the template must name an object (an object that no placeholder names gets no VRTs and
no decoder target, as in the authors' trainer). Malformed lines raise `ValueError` naming the file and line (hub rows:
the repository file and row).

Where records come from (`open_records`): an existing local path is read as JSON lines (whatever its extension; the
released files are called ``*.json``); a path that does not exist locally and looks like ``org/repo/file.json`` is
loaded with ``datasets.load_dataset("org/repo", data_files="file.json")["train"]`` (the authors' rule in
``src/PaDT/sft_train.py``; docs/training.md).

Several files (`load_sources`): the authors' ":"-separated ``data_file_paths`` + ``image_folders`` (equal counts),
or a YAML file holding a list of ``{path, image_folder, repeat (default 1), name (optional)}`` (also accepted under
a top-level ``datasets:`` key). ``repeat`` oversamples a file (the Pro mix uses COCO twice).
"""

# ruff: noqa: TRY004 -- a malformed record is bad file content (ValueError naming file and line), not a TypeError
from __future__ import annotations

import json
import logging
import math
import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from padt.data.sampling import OBJ_PLACEHOLDER, placeholder_ids
from padt.processing.vrt import VRT_TOKEN_PATTERN

logger = logging.getLogger(__name__)

RECORD_FIELDS = ("image", "conversations", "answer_template", "objects", "task")
YAML_SUFFIXES = (".yaml", ".yml")
_SOURCE_KEYS = {"path", "image_folder", "repeat", "name"}


# =========================================================================== validation
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_record(record: Any, where: str) -> None:
    """Raise `ValueError` (message starts with ``where``) unless ``record`` has the fields and types of the released
    format (docs/preprocessing.md, "Output: one JSON object per line")."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    missing = [k for k in RECORD_FIELDS if record.get(k) is None]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing} (a record needs {list(RECORD_FIELDS)})")
    image = record["image"]
    if isinstance(image, (list, tuple)):
        if len(image) != 1:
            raise ValueError(f"{where}: 'image' lists {len(image)} files; PaDT training records hold exactly one "
                             "image")
        image = image[0]
    if not isinstance(image, str) or not image:
        raise ValueError(f"{where}: 'image' must be a non-empty file name, got {record['image']!r:.80}")
    conv = record["conversations"]
    first = conv[0] if isinstance(conv, list) and conv else None
    if not isinstance(first, dict) or not isinstance(first.get("value"), str):
        raise ValueError(f"{where}: 'conversations' must be a list whose first entry has a str 'value' (the prompt)")
    template, objects, task = record["answer_template"], record["objects"], record["task"]
    if not isinstance(template, str):
        raise ValueError(f"{where}: 'answer_template' must be a str, got {type(template).__name__}")
    if not isinstance(task, str):
        raise ValueError(f"{where}: 'task' must be a str, got {type(task).__name__}")
    if not isinstance(objects, list):
        raise ValueError(f"{where}: 'objects' must be a list, got {type(objects).__name__}")
    for k, obj in enumerate(objects):
        _validate_object(obj, f"{where}: objects[{k}]")
    if VRT_TOKEN_PATTERN.search(template):
        raise ValueError(f"{where}: 'answer_template' contains a literal VRT token; use <|Obj_k|> placeholders")
    ids = placeholder_ids(template)
    if template.count(OBJ_PLACEHOLDER) != len(ids):
        raise ValueError(f"{where}: 'answer_template' has a malformed <|Obj_k|> placeholder: {template!r:.120}")
    bad = sorted({k for k in ids if k >= len(objects)})
    if bad:
        raise ValueError(f"{where}: 'answer_template' names object(s) {bad} but the record has {len(objects)} "
                         "object(s)")


def _validate_object(obj: Any, where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: must be a JSON object, got {type(obj).__name__}")
    box = obj.get("bbox")
    if box is None:
        raise ValueError(f"{where}: missing field 'bbox' (normalised [x1, y1, x2, y2])")
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
        raise ValueError(f"{where}: 'bbox' must be 4 finite numbers [x1, y1, x2, y2], got {box!r:.80}")
    if box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"{where}: 'bbox' {list(box)} has x2 < x1 or y2 < y1")
    rle = obj.get("rle")
    if rle is not None:
        size = rle.get("size") if isinstance(rle, dict) else None
        if not isinstance(size, (list, tuple)) or len(size) != 2 or rle.get("counts") is None:
            raise ValueError(f"{where}: 'rle' must be a COCO RLE {{'size': [H, W], 'counts': ...}}, got {rle!r:.80}")
    label = obj.get("label")
    if label is not None and not isinstance(label, str):
        raise ValueError(f"{where}: 'label' must be a str, got {type(label).__name__}")
    patches = obj.get("patches")
    if patches is not None and not isinstance(patches, (list, tuple)):
        raise ValueError(f"{where}: 'patches' must be a list of cell indices, got {type(patches).__name__}")


# =========================================================================== record stores
class JsonlRecords:
    """Random access to the records of a local JSON-lines file.

    The file is parsed and validated once at construction (so a malformed line fails before training starts, with its
    line number); only byte offsets are kept, and `__getitem__` re-reads one line. Blank lines are skipped.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data file not found: {self.path}")
        self._offsets = array("q")
        self._lines = array("q")
        self._images: list[str] = []
        with open(self.path, "rb") as f:
            offset = 0
            for lineno, raw in enumerate(f, start=1):
                if raw.strip():
                    where = f"{self.path}:{lineno}"
                    record = self._parse(raw, where)
                    validate_record(record, where)
                    self._offsets.append(offset)
                    self._lines.append(lineno)
                    image = record["image"]
                    self._images.append(image[0] if isinstance(image, (list, tuple)) else image)
                offset += len(raw)

    @staticmethod
    def _parse(raw: bytes, where: str) -> Any:
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            is_array = raw.strip() in (b"[", b"[{")
            hint = " (the file must hold one JSON object per line, not a JSON array)" if is_array else ""
            raise ValueError(f"{where}: malformed JSON: {err}{hint}") from None

    def __len__(self) -> int:
        return len(self._offsets)

    def where(self, i: int) -> str:
        """``path:line`` of record ``i``."""
        return f"{self.path}:{self._lines[i]}"

    def image_names(self) -> list[str]:
        return list(self._images)

    def __getitem__(self, i: int) -> dict:
        # opened per access: a handle shared by forked DataLoader workers would share its file position
        with open(self.path, "rb") as f:
            f.seek(self._offsets[i])
            raw = f.readline()
        return self._parse(raw, self.where(i))

    def __repr__(self) -> str:
        return f"JsonlRecords({str(self.path)!r}, {len(self)} records)"


class HubRecords:
    """Records of a file in a dataset-hub repository, through ``datasets.load_dataset(repo, data_files=file)``.

    Rows stay in the memory-mapped Arrow table; each row is validated when it is read (``where`` =
    ``repo/file row i``).
    """

    def __init__(self, repo: str, file: str):
        import datasets

        self.repo, self.file = repo, file
        logger.info("loading %s from dataset repository %s", file, repo)
        self._ds = datasets.load_dataset(repo, data_files=file)["train"]
        missing = [k for k in RECORD_FIELDS if k not in self._ds.column_names]
        if missing:
            raise ValueError(f"{repo}/{file}: missing column(s) {missing} (a record needs {list(RECORD_FIELDS)}); "
                             f"columns are {self._ds.column_names}")

    def __len__(self) -> int:
        return len(self._ds)

    def where(self, i: int) -> str:
        return f"{self.repo}/{self.file} row {i}"

    def image_names(self) -> list[str]:
        return [im[0] if isinstance(im, (list, tuple)) else im for im in self._ds["image"]]

    def __getitem__(self, i: int) -> dict:
        record = self._ds[int(i)]
        validate_record(record, self.where(i))
        return record

    def __repr__(self) -> str:
        return f"HubRecords({self.repo!r}, {self.file!r}, {len(self)} records)"


def split_hub_path(path: str | os.PathLike) -> tuple[str, str] | None:
    """``"org/repo/dir/file.json" -> ("org/repo", "dir/file.json")``; None unless it has that shape."""
    text = os.fspath(path)
    if os.path.isabs(text) or "\\" in text:
        return None
    parts = text.split("/")
    if len(parts) < 3 or any(p in ("", ".", "..") for p in parts):
        return None
    return f"{parts[0]}/{parts[1]}", "/".join(parts[2:])


def open_records(path: str | os.PathLike) -> JsonlRecords | HubRecords:
    """A local JSON-lines file, or (if ``path`` does not exist locally and looks like ``org/repo/file``) a hub file."""
    if os.path.isfile(path):
        return JsonlRecords(path)
    if os.path.exists(path):
        raise ValueError(f"data file {path} is not a regular file")
    hub = split_hub_path(path)
    if hub is None:
        raise FileNotFoundError(f"data file not found: {path} (not a local file, and not an 'org/repo/file' "
                                "dataset-hub path)")
    return HubRecords(*hub)


# =========================================================================== sources (several files mixed)
@dataclass(frozen=True)
class DataSource:
    """One data file of a mixture: records at ``path``, images under ``image_folder`` (None: names as written),
    sampled ``repeat`` times per epoch; ``name`` labels it in reports (default: the path)."""

    path: str
    image_folder: str | None = None
    repeat: int = 1
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"DataSource.path must be a non-empty str, got {self.path!r}")
        if isinstance(self.repeat, bool) or not isinstance(self.repeat, int) or self.repeat < 1:
            raise ValueError(f"DataSource.repeat must be an int >= 1, got {self.repeat!r} (for {self.path})")

    @property
    def label(self) -> str:
        return self.name or self.path


def parse_sources(data_file_paths: str, image_folders: str | None = None) -> list[DataSource]:
    """The authors' form: ``"a.json:b.json"`` and ``"imgs_a:imgs_b"`` (equal counts; ``image_folders`` None =
    image names are paths as written)."""
    paths = [p for p in str(data_file_paths).split(":")]
    if any(not p for p in paths):
        raise ValueError(f"data_file_paths has an empty entry: {data_file_paths!r}")
    if image_folders is None:
        return [DataSource(p) for p in paths]
    folders = str(image_folders).split(":")
    if len(folders) != len(paths):
        raise ValueError(f"data_file_paths names {len(paths)} file(s) but image_folders names {len(folders)} "
                         f"folder(s); give one image folder per data file, ':'-separated")
    return [DataSource(p, f or None) for p, f in zip(paths, folders)]


def load_sources_yaml(path: str | os.PathLike) -> list[DataSource]:
    """Read a YAML mixture: a list of ``{path, image_folder, repeat, name}`` (or that list under ``datasets:``).

    Relative ``path``/``image_folder`` entries are taken relative to the YAML file's folder when they exist there,
    else as written (relative to the working directory, or a hub path).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data mixture YAML not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            doc = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: malformed YAML: {err}") from None
    if isinstance(doc, dict) and "datasets" in doc:
        doc = doc["datasets"]
    if not isinstance(doc, list) or not doc:
        raise ValueError(f"{path}: expected a non-empty list of {{path, image_folder, repeat}} entries")
    out = []
    for i, entry in enumerate(doc):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict) or "path" not in entry:
            raise ValueError(f"{where}: each entry must be a mapping with at least 'path', got {entry!r:.80}")
        unknown = sorted(set(entry) - _SOURCE_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_SOURCE_KEYS)}")
        folder = entry.get("image_folder")
        try:
            out.append(DataSource(_near(path.parent, str(entry["path"])),
                                  _near(path.parent, str(folder)) if folder is not None else None,
                                  entry.get("repeat", 1), entry.get("name")))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    return out


def _near(base: Path, value: str) -> str:
    if os.path.isabs(value):
        return value
    candidate = base / value
    return str(candidate) if candidate.exists() else value


def load_sources(data_file_paths: str | os.PathLike | Sequence[DataSource],
                 image_folders: str | None = None) -> list[DataSource]:
    """Any accepted form -> list of `DataSource`: a YAML file path, a ":"-separated path string (+ image folders),
    or a list of `DataSource`."""
    if isinstance(data_file_paths, (list, tuple)):
        if not all(isinstance(s, DataSource) for s in data_file_paths):
            raise TypeError("a list of sources must hold DataSource objects")
        return list(data_file_paths)
    text = os.fspath(data_file_paths)
    if text.lower().endswith(YAML_SUFFIXES) and ":" not in text:
        if image_folders is not None:
            raise ValueError("image_folders must not be given with a YAML mixture (each entry has its image_folder)")
        return load_sources_yaml(text)
    return parse_sources(text, image_folders)
