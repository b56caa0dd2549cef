"""The cell-category auxiliary loss (padt/shapes/cell_class_loss.py): targets, value, gradients and its place in
training (an auxiliary loss of the criterion, padt/train/auxiliary.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from padt.shapes.cell_class_loss import IGNORE, CellClasses, cell_class_loss, cell_class_targets
from padt.testing.sft_data import COLOURS, SHAPES
from padt.train.step import compute_padt_loss, unwrap_padt_model
from padt.train.trainer import build_criterion
from tests.test_trainer import build, train_args

TINY_LABELS = [f"{c} {k}" for c in COLOURS for k in SHAPES]


def test_targets_label_cells_of_named_objects_and_ignore_conflicts():
    objects = [
        [{"fg_cells": [0, 1, 2], "label": "circle"}, {"fg_cells": [2, 3], "label": "square"}],
        [{"fg_cells": [5, 6], "label": "the red circle"}, {"fg_cells": [6, 7], "label": "square"},
         {"fg_cells": [8], "label": "square"}, {"fg_cells": [8, 9], "label": "square"}],
    ]
    targets = cell_class_targets(objects, ["square", "circle"], num_cells=11)
    # cell 2: circle and square -> ignored; 5, 6: claimed by a sentence label; 8: twice the same class -> kept
    assert targets.tolist() == [1, 1, IGNORE, 0, IGNORE, IGNORE, IGNORE, 0, 0, 0, IGNORE]
    with pytest.raises(ValueError, match="outside the batch's 11 cells"):
        cell_class_targets([[{"fg_cells": [11], "label": "square"}]], ["square", "circle"], num_cells=11)


def test_phrase_match_labels_cells_by_the_one_class_a_sentence_names():
    """`match="phrase"`: a label names a class when the class name occurs in it as whole words and no other does."""
    names = ["red square", "red circle", "blue square"]
    objects = [[{"fg_cells": [0, 1], "label": "the red square on the left"},
                {"fg_cells": [2], "label": "the blue square"},
                {"fg_cells": [3], "label": "red squares"},  # not whole words
                {"fg_cells": [4], "label": "the red square left of the red circle"},  # two classes: ambiguous
                {"fg_cells": [5], "label": "red circle"},
                {"fg_cells": [6], "label": ""}]]
    assert cell_class_targets(objects, names, num_cells=8, match="phrase").tolist() == [
        0, 0, 2, IGNORE, IGNORE, 1, IGNORE, IGNORE]
    # the default, exact match, labels only the object whose label is a name
    assert cell_class_targets(objects, names, num_cells=8).tolist() == [IGNORE] * 5 + [1, IGNORE, IGNORE]
    with pytest.raises(ValueError, match="match must be one of"):
        cell_class_targets(objects, names, num_cells=8, match="substring")


def test_an_object_without_label_is_named_by_its_mention():
    """RIC objects have label "" (released format); the caption words before their reference name them instead."""
    names = ["red square", "blue square"]
    objects = [[{"fg_cells": [0, 1], "label": "", "mention": "A red square"},
                {"fg_cells": [2], "label": "", "mention": "and a blue square"},
                {"fg_cells": [3], "label": "the red square", "mention": "a blue square"},  # the label wins
                {"fg_cells": [4], "label": "", "mention": ""},
                {"fg_cells": [5], "label": ""}]]
    assert cell_class_targets(objects, names, num_cells=6, match="phrase").tolist() == [0, 0, 1, 0, IGNORE, IGNORE]
    # exact match: a mention is a phrase, not a class name
    assert cell_class_targets(objects, names, num_cells=6).tolist() == [IGNORE] * 6


def test_loss_is_the_cross_entropy_of_labelled_cells_and_reaches_features_and_class_vectors():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 8, generator=gen, requires_grad=True)
    vectors = torch.randn(3, 8, generator=gen, requires_grad=True)
    targets = torch.tensor([2, IGNORE, 0, 1, IGNORE, 2])
    loss, accuracy = cell_class_loss(feats, vectors, targets)
    keep = targets != IGNORE
    logits = feats[keep] @ vectors.T
    assert loss.item() == pytest.approx(F.cross_entropy(logits, targets[keep]).item(), rel=1e-6)
    assert accuracy.item() == pytest.approx((logits.argmax(-1) == targets[keep]).float().mean().item())
    loss.backward()
    assert feats.grad[~keep].abs().sum() == 0 and (feats.grad[keep].abs().sum(-1) > 0).all()
    assert (vectors.grad.abs().sum(-1) > 0).all()


def test_loss_without_labelled_cells_is_zero_and_connected():
    feats = torch.randn(4, 8, requires_grad=True)
    vectors = torch.randn(2, 8, requires_grad=True)
    loss, accuracy = cell_class_loss(feats, vectors, torch.full((4,), IGNORE))
    assert loss.item() == 0 and accuracy is None
    loss.backward()
    assert feats.grad is not None and vectors.grad is not None
    with pytest.raises(ValueError, match="4 cell features but 3 cell targets"):
        cell_class_loss(feats, vectors, torch.zeros(3, dtype=torch.long))


def test_class_vectors_average_each_names_token_rows_and_bad_classes_are_named():
    classes = CellClasses(("a", "b"), ((1, 3), (2,)))
    emb = torch.arange(20.0).reshape(5, 4)
    assert torch.equal(classes.class_vectors(emb), torch.stack([(emb[1] + emb[3]) / 2, emb[2]]))
    with pytest.raises(ValueError, match="at least 2 class names"):
        CellClasses(("a",), ((1,),))
    with pytest.raises(ValueError, match="repeat"):
        CellClasses(("a", "a"), ((1,), (2,)))
    with pytest.raises(ValueError, match="same tokens"):
        CellClasses(("a", "b"), ((1,), (1,)))
    with pytest.raises(ValueError, match="at least one token id"):
        CellClasses(("a", "b"), ((1,), ()))
    with pytest.raises(ValueError, match="match must be one of"):
        CellClasses(("a", "b"), ((1,), (2,)), "fuzzy")


def test_arguments_need_names_and_weight_together(tmp_path):
    with pytest.raises(ValueError, match="at least two --cell_class_names"):
        train_args(tmp_path, cell_class_loss_coef=1.0)
    with pytest.raises(ValueError, match="cell_class_loss_coef is 0"):
        train_args(tmp_path, cell_class_names=["square", "circle"])
    with pytest.raises(ValueError, match="cell_class_loss_coef must be >= 0"):
        train_args(tmp_path, cell_class_loss_coef=-1.0, cell_class_names=["square", "circle"])
    with pytest.raises(ValueError, match="cell_class_match must be one of"):
        train_args(tmp_path, cell_class_loss_coef=1.0, cell_class_names=["square", "circle"], cell_class_match="word")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from padt.testing.sft_data import make_tiny_sft_workspace

    return make_tiny_sft_workspace(tmp_path_factory.mktemp("cell_ws"), num_images=4, num_empty=0)


def test_training_loss_adds_the_weighted_term_and_teaches_the_tower(workspace, tmp_path):
    """The term is `weight x loss_cell_class` on top of the PaDT total; its gradient reaches the ViT and the class
    names' embedding rows; a few steps on it alone raise the cells' class accuracy."""
    trainer = build(workspace, train_args(tmp_path, cell_class_loss_coef=0.5, cell_class_names=TINY_LABELS,
                                          cell_class_match="phrase"))
    (hook,) = trainer.criterion.auxiliary_losses  # built from the arguments (padt.train.auxiliary)
    classes = hook.classes
    assert classes is not None and classes.names == tuple(TINY_LABELS)
    assert trainer.criterion.weight_dict["loss_cell_class"] == 0.5  # the weight is the criterion's
    assert classes.match == "phrase"
    assert all(len(ids) >= 2 for ids in classes.token_ids)  # "red square": several tokens, averaged
    model = trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])

    torch.manual_seed(0)
    plain, plain_logs = compute_padt_loss(model, batch, criterion=build_criterion(trainer.args),
                                          use_prototype_features=False)
    torch.manual_seed(0)
    total, logs = compute_padt_loss(model, batch, criterion=trainer.criterion, use_prototype_features=False)
    assert "loss_cell_class" not in plain_logs
    assert logs["loss_cell_class"] > 0 and 0 <= logs["cell_class_accuracy"] <= 1
    assert total.item() == pytest.approx(plain.item() + 0.5 * logs["loss_cell_class"].item(), rel=1e-5)

    model.zero_grad()
    (total - plain).backward()
    padt = unwrap_padt_model(model)
    assert padt.model.visual.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    emb_grad = padt.get_input_embeddings().weight.grad
    rows = sorted({i for ids in classes.token_ids for i in ids})
    assert emb_grad[rows].abs().sum(-1).gt(0).all()
    others = torch.ones(emb_grad.shape[0], dtype=torch.bool)
    others[rows] = False
    assert emb_grad[others].abs().sum() == 0  # only the class rows (the PaDT terms were subtracted out)

    # learning: optimise the term alone on this batch; accuracy of the labelled cells rises to 1
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(40):
        state = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                      mm_token_type_ids=batch["mm_token_type_ids"], logits_to_keep=1, use_cache=False).padt_state
        targets = cell_class_targets(batch["objects"], classes.names, state.image_embeds.shape[0], classes.match)
        loss, acc = cell_class_loss(state.image_embeds, classes.class_vectors(padt.get_input_embeddings().weight),
                                    targets)
        first = (loss.item(), acc.item()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first[0] and acc.item() == 1.0, (first, loss.item(), acc.item())
