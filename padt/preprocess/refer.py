"""A small, safe reader for the REFER-format RefCOCO/RefCOCO+/RefCOCOg annotations.

Layout (as distributed by the REFER authors): ``<root>/<dataset>/refs(<split_by>).p`` (a Python-2 pickle of a list
of ref dicts) and ``<root>/<dataset>/instances.json`` (COCO-format images/annotations/categories of train2014).
The pickle holds only plain containers, so it is loaded with an unpickler that refuses every class or function
reference: a tampered file cannot run code, it fails with an error naming what it tried to load.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from padt.io import load_json, require_file

REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")


class _PlainUnpickler(pickle.Unpickler):
    """Unpickler for plain data (dict/list/tuple/str/bytes/int/float/bool/None): every global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refusing to load '{module}.{name}': only plain containers are allowed in this pickle"
        )


def load_plain_pickle(path: str | os.PathLike, *, encoding: str = "utf-8", what: str = "pickle file") -> Any:
    """Load a pickle of plain containers; any class/function reference raises pickle.UnpicklingError.

    ``encoding`` decodes Python-2 ``str`` objects (the REFER files were written by Python 2).
    """
    path = require_file(path, what)
    with open(path, "rb") as f:
        try:
            return _PlainUnpickler(f, encoding=encoding).load()
        except pickle.UnpicklingError as err:
            raise pickle.UnpicklingError(f"{what} {path}: {err}") from None
        except (EOFError, ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{what} {path} is not a readable pickle: {err}") from None


@dataclass
class ReferDataset:
    """Refs of one REFER dataset with their COCO images/annotations, looked up by id."""

    name: str
    split_by: str
    refs: list[dict]
    images: dict[Any, dict]
    annotations: dict[Any, dict]
    categories: dict[Any, str]

    @classmethod
    def load(cls, root: str | os.PathLike, dataset: str, split_by: str) -> ReferDataset:
        folder = Path(root) / dataset
        refs_path = folder / f"refs({split_by}).p"
        refs = load_plain_pickle(refs_path, what=f"REFER refs file for {dataset} ({split_by})")
        if not isinstance(refs, list):
            raise TypeError(f"REFER refs file {refs_path}: expected a list of refs, got {type(refs).__name__}")
        for i, ref in enumerate(refs):
            missing = [k for k in REF_KEYS if not isinstance(ref, dict) or k not in ref]
            if missing or not isinstance(ref["sentences"], list):
                raise ValueError(f"REFER refs file {refs_path}: refs[{i}] lacks {missing or ['a sentences list']}")
        inst_path = folder / "instances.json"
        inst = load_json(inst_path, what=f"REFER instances file for {dataset}")
        for key in ("images", "annotations"):
            if not isinstance(inst, dict) or not isinstance(inst.get(key), list):
                raise TypeError(f"REFER instances file {inst_path}: missing or non-list '{key}'")
        try:
            images = {img["id"]: img for img in inst["images"]}
            annotations = {ann["id"]: ann for ann in inst["annotations"]}
            categories = {c["id"]: c.get("name", "") for c in inst.get("categories", [])}
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"REFER instances file {inst_path}: an entry lacks its 'id' ({err!r})") from None
        return cls(dataset, split_by, refs, images, annotations, categories)

    def split_names(self) -> list[str]:
        """The split names present in the refs, sorted."""
        return sorted({str(ref["split"]) for ref in self.refs})

    def refs_for_split(self, split: str) -> list[dict]:
        """Refs whose ``split`` equals ``split`` exactly, in file order."""
        return [ref for ref in self.refs if ref["split"] == split]
