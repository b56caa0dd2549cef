"""Cell-category auxiliary loss: each labelled image cell's feature should point at its category's word embedding.

Not in the authors' code. Their tower comes pretrained with Qwen2.5-VL and already tells object categories apart; a
tower trained from scratch (the tiny shapes model, docs/shapes.md) learns the colours of the shapes but hardly their
kind, because the PaDT losses ask for it only indirectly. This term asks for it directly, with no new parameters:

    logits[c, k] = E_img[c] . mean(word embedding rows of class name k)          (N_labelled, K)
    loss_cell_class = cross_entropy(logits, class of cell c)

`E_img` are the raw merger outputs of the batch's images (what the LLM reads at `<|image_pad|>`), and the class
vectors are the LLM's own input-embedding rows of the class names' tokens. So the term lives entirely in the model: it
needs no head to save, load or synchronise across ranks. A cell is labelled when it is a foreground cell (`fg_cells`)
of a batch object whose label names a class, and of no object with another label; all other cells are ignored. An
object's label is its `label` or, when that is empty (RIC objects in the released format), its `mention`: the answer's
words that introduce it ("A red square (<|Obj_0|>), ..." -> "A red square", `padt.data.sampling.placeholder_mentions`).

How a label names a class (`match`): `"exact"`, the label is the class name (in the shapes data: the OVD records'
objects, whose labels are the kinds); `"phrase"`, the class name occurs in the label as whole words, and no other class
name does (the referring expression "the red square on the left" names the class "red square", and so does the
caption mention "A red square"). A class name of several words gets the mean embedding of all its tokens, so colour x
kind classes tie each cell to both words.

`CellClassLoss` plugs the term into training as a `padt.train.auxiliary.AuxiliaryLoss` named ``cell_class``: it is
logged as ``loss_cell_class`` (plus ``cell_class_accuracy`` when a cell is labelled) and weighed by the criterion's
``weight_dict["loss_cell_class"]``, i.e. ``--cell_class_loss_coef``. `python -m padt.train` adds it when that flag is
> 0 (registered in `padt.train.auxiliary.AUXILIARY_LOSSES`; flags `--cell_class_names`, `--cell_class_match`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from padt.train.step import unwrap_padt_model

__all__ = [
    "MATCH_MODES",
    "CellClassLoss",
    "CellClasses",
    "cell_class_loss",
    "cell_class_targets",
    "check_match",
    "label_classifier",
]

IGNORE = -100
MATCH_MODES = ("exact", "phrase")


@dataclass(frozen=True)
class CellClasses:
    """The categories of the cell-class loss (its weight is the criterion's, see `CellClassLoss`).

    Attributes:
        names: category names, matched against object labels as `match` says.
        token_ids: per name, its token ids (their input-embedding rows are averaged into the class vector).
        match: how an object label names a class, `"exact"` or `"phrase"` (module docstring).
    """

    names: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    match: str = "exact"

    def __post_init__(self) -> None:
        if len(self.names) < 2:
            raise ValueError(f"the cell-class loss needs at least 2 class names, got {list(self.names)}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"cell class names repeat: {list(self.names)}")
        if len(self.token_ids) != len(self.names) or any(len(ids) == 0 for ids in self.token_ids):
            raise ValueError(f"every cell class name needs at least one token id, got {list(self.token_ids)} for "
                             f"{list(self.names)}")
        if len(set(self.token_ids)) != len(self.names):
            raise ValueError(f"two cell class names encode to the same tokens: {list(self.token_ids)}")
        check_match(self.match)

    @classmethod
    def from_tokenizer(cls, names: Sequence[str], tokenizer: Any, match: str = "exact") -> CellClasses:
        """Encode each name without special tokens."""
        ids = tuple(tuple(int(i) for i in tokenizer.encode(n, add_special_tokens=False)) for n in names)
        return cls(tuple(names), ids, match)

    def class_vectors(self, embedding: torch.Tensor) -> torch.Tensor:
        """`(K, H)`: the mean input-embedding row of each name's tokens (`embedding` is `(vocab, H)`)."""
        return torch.stack([embedding[list(ids)].mean(0) for ids in self.token_ids])


def check_match(match: str) -> None:
    """`ValueError` unless `match` is one of `MATCH_MODES`."""
    if match not in MATCH_MODES:
        raise ValueError(f"cell_class_match must be one of {MATCH_MODES}, got {match!r}")


def label_classifier(names: Sequence[str], match: str = "exact") -> Callable[[str], int]:
    """`label -> class index or -1`: the class the label names under `match` (module docstring), -1 for none or,
    with `"phrase"`, for a label naming several classes."""
    check_match(match)
    if match == "exact":
        index = {name: k for k, name in enumerate(names)}
        return lambda label: index.get(label, -1)
    patterns = [re.compile(r"(?<!\w)" + re.escape(name) + r"(?!\w)") for name in names]

    def classify(label: str) -> int:
        found = [k for k, pattern in enumerate(patterns) if pattern.search(label)]
        return found[0] if len(found) == 1 else -1

    return classify


def cell_class_targets(
    objects: Sequence[Sequence[Mapping[str, Any]]], names: Sequence[str], num_cells: int, match: str = "exact"
) -> torch.Tensor:
    """Class index of every global cell of the batch, or `IGNORE` (-100).

    Args:
        objects: the collator's objects, per sample, per object, with `fg_cells` (global cell indices), `label` and
            optionally `mention` (used when `label` is empty).
        names: the class names; an object whose label names none of them claims its cells as "unlabelled".
        num_cells: N_cells of the batch.
        match: `"exact"` (the label is the name) or `"phrase"` (the label contains exactly one name as whole words).
    Returns:
        `torch.LongTensor` of shape `(N_cells,)`. A cell claimed by objects of two different classes, or by any
        object with another label, is `IGNORE`.
    """
    classify = label_classifier(names, match)
    targets = torch.full((num_cells,), IGNORE, dtype=torch.long)
    conflict = torch.zeros(num_cells, dtype=torch.bool)
    for objs in objects:
        for obj in objs:
            cells = torch.as_tensor([int(c) for c in obj["fg_cells"]], dtype=torch.long)
            if cells.numel() and (int(cells.min()) < 0 or int(cells.max()) >= num_cells):
                raise ValueError(f"object fg_cells {cells.tolist()} outside the batch's {num_cells} cells")
            k = classify(obj.get("label") or obj.get("mention") or "")
            if k < 0:
                conflict[cells] = True
                continue
            current = targets[cells]
            conflict[cells[(current != IGNORE) & (current != k)]] = True
            targets[cells] = k
    targets[conflict] = IGNORE
    return targets


def cell_class_loss(
    image_embeds: torch.Tensor, class_vectors: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean cross-entropy of the labelled cells and their accuracy.

    Args:
        image_embeds (`torch.Tensor` of shape `(N_cells, H)`): merger outputs.
        class_vectors (`torch.Tensor` of shape `(K, H)`).
        targets (`torch.LongTensor` of shape `(N_cells,)`): from `cell_class_targets`.
    Returns:
        `(loss, accuracy)`: a scalar (0, still connected to the graph, when no cell is labelled) and the accuracy of
        the labelled cells (None when there are none).
    """
    if image_embeds.shape[0] != targets.shape[0]:
        raise ValueError(f"{image_embeds.shape[0]} cell features but {targets.shape[0]} cell targets")
    keep = (targets != IGNORE).nonzero().squeeze(1).to(image_embeds.device)
    if keep.numel() == 0:
        return image_embeds.sum() * 0.0 + class_vectors.sum() * 0.0, None
    logits = image_embeds.index_select(0, keep).float() @ class_vectors.float().T
    labels = targets.to(image_embeds.device).index_select(0, keep)
    accuracy = (logits.argmax(-1) == labels).float().mean().detach()
    return F.cross_entropy(logits, labels), accuracy


@dataclass(frozen=True)
class CellClassLoss:
    """The cell-class term as a training auxiliary loss (`padt.train.auxiliary.AuxiliaryLoss`, name ``cell_class``).

    Attributes:
        classes (`CellClasses`): the categories, their tokens and the label match.
    """

    classes: CellClasses
    name: ClassVar[str] = "cell_class"

    def __call__(
        self, model: nn.Module, batch: Mapping[str, Any], outputs: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`(loss_cell_class, {"cell_class_accuracy": ...})` of a batch (the accuracy only when a cell is labelled),
        from the merger outputs of its images (`outputs.padt_state.image_embeds`, `(N_cells, H)`) and the model's
        input-embedding rows of the class names."""
        state = outputs.padt_state
        if state is None or state.image_embeds is None:
            raise ValueError("the cell-class loss needs images (pixel_values, image_grid_thw) in the batch")
        embedding = unwrap_padt_model(model).get_input_embeddings().weight
        if embedding.numel() == 0:
            raise ValueError("the cell-class loss reads the input embedding, which is partitioned here (ZeRO-3); "
                             "use ZeRO-2 or turn the loss off")
        classes = self.classes
        targets = cell_class_targets(batch["objects"], classes.names, state.image_embeds.shape[0], classes.match)
        loss, accuracy = cell_class_loss(state.image_embeds, classes.class_vectors(embedding), targets)
        return loss, ({} if accuracy is None else {"cell_class_accuracy": accuracy})

    # ------------------------------------------------------------------ `padt.train.auxiliary` registry interface
    @staticmethod
    def check_args(args: Any) -> None:
        """`ValueError` for inconsistent `--cell_class_loss_coef`, `--cell_class_names`, `--cell_class_match`."""
        if args.cell_class_loss_coef > 0 and len(args.cell_class_names) < 2:
            raise ValueError("cell_class_loss_coef > 0 needs at least two --cell_class_names (the object labels to "
                             f"learn), got {args.cell_class_names}")
        check_match(args.cell_class_match)
        if args.cell_class_names and args.cell_class_loss_coef == 0:
            raise ValueError(f"--cell_class_names {args.cell_class_names} given but cell_class_loss_coef is 0: set "
                             "a weight or drop the names")

    @classmethod
    def from_args(cls, args: Any, processing_class: Any) -> CellClassLoss:
        """The loss of `--cell_class_names` / `--cell_class_match`, the names encoded by the processor's tokenizer."""
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if tokenizer is None:
            raise ValueError("cell_class_loss_coef > 0 needs processing_class (its tokenizer encodes the names)")
        return cls(CellClasses.from_tokenizer(args.cell_class_names, tokenizer, args.cell_class_match))
