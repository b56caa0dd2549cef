"""VRT sampling per object and answer-text construction (step 3 of the authors' `compute_loss` in
`src/PaDT/trainer/padt_sft_trainer.py`; docs/method.md#the-training-step-and-losses).

Each ``<|Obj_k|>`` placeholder of a record's ``answer_template`` is replaced by ``num_vrt`` VRT tokens naming cells of
object k: ``num_vrt`` cells drawn uniformly **without** replacement, or **with** replacement when the object has
fewer cells (the authors' rule); ``num_vrt="all"`` (or -1) writes all its cells in row-major order.

Reproducible: the generator of a sample is ``numpy.random.default_rng([seed, epoch, index])`` (`sample_rng`), so a
resumed run, any number of DataLoader workers and any batch composition pick the same VRTs for the same sample in
the same epoch. Objects draw from it in the order of their first placeholder in the text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from padt.processing.vrt import pid2vrt

OBJ_PLACEHOLDER = "<|Obj_"
OBJ_PATTERN = re.compile(r"<\|Obj_(\d+)\|>")
# one reference group: "(<|Obj_1|>, <|Obj_2|>)", or a bare "<|Obj_0|>"
OBJ_GROUP_PATTERN = re.compile(rf"\(?\s*{OBJ_PATTERN.pattern}(?:\s*,\s*{OBJ_PATTERN.pattern})*\s*\)?")
MENTION_STRIP = " \t\n,.;:\"'"
ALL_CELLS = "all"

NumVRT = int | str


def placeholder_ids(template: str) -> list[int]:
    """Object indices of the ``<|Obj_k|>`` placeholders in text order (repeats kept):
    ``"<|Obj_1|> <|Obj_0|>" -> [1, 0]``."""
    return [int(m.group(1)) for m in OBJ_PATTERN.finditer(template)]


def placeholder_mentions(template: str) -> dict[int, str]:
    """Per object index, the words that introduce its first reference group: the text since the previous group (or the
    start), stripped of spaces and punctuation at both ends.

    ``'A red square (<|Obj_0|>) and a yellow circle (<|Obj_1|>, <|Obj_2|>).'`` ->
    ``{0: 'A red square', 1: 'and a yellow circle', 2: 'and a yellow circle'}``. RIC objects have no label in the
    released format (``label`` is "", docs/preprocessing.md), so this is what names them in a caption.
    """
    mentions: dict[int, str] = {}
    end = 0
    for group in OBJ_GROUP_PATTERN.finditer(template):
        words = template[end:group.start()].strip(MENTION_STRIP)
        for k in placeholder_ids(group.group(0)):
            mentions.setdefault(k, words)
        end = group.end()
    return mentions


def first_occurrence_order(template: str) -> list[int]:
    """Distinct object indices in the order of their first placeholder."""
    return list(dict.fromkeys(placeholder_ids(template)))


def check_num_vrt(num_vrt: NumVRT) -> NumVRT:
    """Validate ``num_vrt``: an int >= 1, or ``"all"`` / -1 (all cells). Returns the canonical value."""
    if isinstance(num_vrt, str):
        if num_vrt.strip().lower() == ALL_CELLS:
            return ALL_CELLS
        raise ValueError(f"num_vrt must be an int >= 1 or 'all', got {num_vrt!r}")
    if isinstance(num_vrt, bool) or not isinstance(num_vrt, (int, np.integer)):
        raise TypeError(f"num_vrt must be an int >= 1 or 'all', got {type(num_vrt).__name__}")
    if int(num_vrt) == -1:
        return ALL_CELLS
    if int(num_vrt) < 1:
        raise ValueError(f"num_vrt must be an int >= 1, or 'all' / -1 for all foreground cells, got {num_vrt}")
    return int(num_vrt)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample: ``default_rng([seed, epoch, index])`` (all >= 0)."""
    if min(int(seed), int(epoch), int(index)) < 0:
        raise ValueError(f"seed, epoch and index must be >= 0, got {seed}, {epoch}, {index}")
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def pick_cells(cells: Sequence[int], num_vrt: NumVRT, rng: np.random.Generator) -> list[int]:
    """The VRT cells of one object.

    Args:
        cells: the object's foreground cells (row-major local indices, non-empty).
        num_vrt: ``n >= 1``: n cells uniformly, without replacement if ``len(cells) >= n`` else with replacement;
            ``"all"`` / -1: ``cells`` in their order (no randomness used).
        rng: the sample's generator (`sample_rng`).
    """
    num_vrt = check_num_vrt(num_vrt)
    if len(cells) == 0:
        raise ValueError("an object needs at least one foreground cell to sample VRTs from")
    if num_vrt == ALL_CELLS:
        return [int(c) for c in cells]
    arr = np.asarray(cells, dtype=np.int64)
    return [int(c) for c in rng.choice(arr, size=num_vrt, replace=len(arr) < num_vrt)]


def sample_object_vrts(
    template: str, object_cells: Sequence[Sequence[int]], num_vrt: NumVRT, rng: np.random.Generator
) -> dict[int, list[int]]:
    """Picks for every object the template names, drawn in the order of first placeholders: ``{k: cells}``."""
    picks = {}
    for k in first_occurrence_order(template):
        if k >= len(object_cells):
            raise ValueError(f"the answer template names <|Obj_{k}|> but there are {len(object_cells)} object(s)")
        picks[k] = pick_cells(object_cells[k], num_vrt, rng)
    return picks


def build_answer(template: str, picks: Mapping[int, Sequence[int]] | Sequence[Sequence[int]]) -> str:
    """Replace every ``<|Obj_k|>`` by ``pid2vrt(picks[k])`` (local cell ids). The caller appends the eos string."""

    def sub(m: re.Match) -> str:
        k = int(m.group(1))
        try:
            return pid2vrt(list(picks[k]))
        except (KeyError, IndexError):
            raise ValueError(f"no VRT picks for <|Obj_{k}|> (picks given for {_keys(picks)})") from None

    return OBJ_PATTERN.sub(sub, template)


def _keys(picks) -> list[int]:
    return sorted(picks) if isinstance(picks, Mapping) else list(range(len(picks)))
