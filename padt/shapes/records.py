"""Records of the shapes benchmark: a scene as the released JSONL records of the four tasks (OVD, REC/RES, RIC;
docs/preprocessing.md for the format, docs/method.md#tasks-and-prompts for prompts and answers) and as COCO ground
truth, built with `padt.preprocess.templates` and `padt.preprocess.objects`."""

from __future__ import annotations

from collections.abc import Mapping

from padt.geometry.masks import normalize_box_xywh
from padt.preprocess.objects import make_object
from padt.preprocess.templates import (
    RIC_PROMPT,
    TASK_OVD,
    TASK_REFERRING,
    TASK_RIC,
    make_record,
    obj_placeholder,
    ovd_answer,
    ovd_prompt,
    rec_answer,
    rec_prompt,
)
from padt.shapes.expressions import ObjectFacts
from padt.shapes.options import ShapesConfig
from padt.shapes.scenes import Scene, SceneObject


def json_object(obj: SceneObject, task: str, label: str, config: ShapesConfig) -> dict:
    """The released object fields (patches, bbox, iscrowd, area, rle, label) under ``task``'s foreground rule."""
    bbox = normalize_box_xywh(obj.bbox_xywh, config.width, config.height)
    return make_object(list(obj.patches[task]), bbox, 0, obj.area, dict(obj.rle), label)


def prompt_kinds(scene: Scene, split: str, config: ShapesConfig) -> list[str]:
    """OVD category order: shuffled (the scene's seeded order) or the config's kind (= category id) order."""
    shuffle = config.ovd_prompt_order == "shuffle" or (config.ovd_prompt_order == "auto" and split == "train")
    return list(scene.kind_order) if shuffle else list(config.kinds)


def ovd_record(image_id: int, file_name: str, scene: Scene, split: str, config: ShapesConfig) -> dict:
    """OVD: every kind in the prompt; the answer groups objects by kind in prompt order, reading order inside."""
    kinds = prompt_kinds(scene, split, config)
    groups, objects = [], []
    for kind in kinds:
        members = [o for o in scene.objects if o.shape.kind == kind]
        groups.append((kind, len(members)))
        objects.extend(json_object(o, TASK_OVD, kind, config) for o in members)
    return make_record(image_id, file_name, ovd_prompt(kinds), ovd_answer(groups), objects, TASK_OVD)


def referring_records(image_id: int, file_name: str, scene: Scene, config: ShapesConfig) -> list[dict]:
    """REC/RES: one record per object (reading order), the sentence its generated expression."""
    out = []
    for obj in scene.objects:
        sentence = obj.expression
        out.append(make_record(image_id, file_name, rec_prompt(sentence), rec_answer(sentence),
                               [json_object(obj, TASK_REFERRING, sentence, config)], TASK_REFERRING))
    return out


def caption(scene: Scene, with_refs: bool = True) -> str:
    """``A red circle (<|Obj_0|>), a blue square (<|Obj_1|>) and a white triangle (<|Obj_2|>) on a gray
    background.`` (objects in reading order; without ``with_refs`` the placeholders are left out)."""
    phrases = [f"a {o.shape.colour} {o.shape.kind}" + (f" ({obj_placeholder(k)})" if with_refs else "")
               for k, o in enumerate(scene.objects)]
    if not phrases:
        return f"An empty {scene.background} background."
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{listed[0].upper()}{listed[1:]} on a {scene.background} background."


def ric_record(image_id: int, file_name: str, scene: Scene, config: ShapesConfig) -> dict:
    """RIC: the caption of :func:`caption`, objects in caption order, labels ""."""
    objects = [json_object(o, TASK_RIC, "", config) for o in scene.objects]
    return make_record(image_id, file_name, RIC_PROMPT, caption(scene), objects, TASK_RIC)


def coco_entries(image_id: int, file_name: str, scene: Scene, first_ann_id: int,
                 config: ShapesConfig) -> tuple[dict, list[dict]]:
    """A COCO ``images`` entry and its ``annotations`` (reading order; RLE segmentation; category ids 1.. in
    ``config.kinds`` order; the colour and kind also under ``attributes``)."""
    image = {"id": image_id, "file_name": file_name, "height": scene.height, "width": scene.width,
             "background": scene.background}
    anns = []
    for k, obj in enumerate(scene.objects):
        anns.append({
            "id": first_ann_id + k, "image_id": image_id, "category_id": config.kinds.index(obj.shape.kind) + 1,
            "segmentation": dict(obj.rle), "area": obj.area, "bbox": list(obj.bbox_xywh), "iscrowd": 0,
            "attributes": {"colour": obj.shape.colour, "kind": obj.shape.kind, "expression": obj.expression},
        })
    return image, anns


def coco_categories(config: ShapesConfig) -> list[dict]:
    return [{"id": i + 1, "name": kind, "supercategory": "shape"} for i, kind in enumerate(config.kinds)]


def facts_from_coco(ann: Mapping) -> ObjectFacts:
    """ObjectFacts of a COCO annotation written by :func:`coco_entries` (for checking expressions from the files)."""
    x, y, w, h = (float(v) for v in ann["bbox"])
    attrs = ann["attributes"]
    return ObjectFacts(attrs["colour"], attrs["kind"], x + w / 2, y + h / 2, float(ann["area"]))
