"""Prompt and answer templates of the three PaDT tasks (docs/method.md#tasks-and-prompts), and the JSONL record layout
(docs/preprocessing.md).

Training targets replace each ``<|Obj_k|>`` placeholder of ``answer_template`` with object k's sampled VRTs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

TASK_OVD = "ovd"
TASK_REFERRING = "refering"  # [sic]: the released data and the authors' code spell it this way
TASK_RIC = "ric"

OVD_PROMPT_PREFIX = "Please carefully check the image and detect the following objects: "
OVD_NONE_ANSWER = "No objects from the list are present in the image."
REC_PROMPT = 'Please carefully check the image and detect the object this sentence describes: "{sentence}".'
REC_ANSWER = 'The "{sentence}" refers to {obj} in this image.'
RIC_PROMPT = "Please describe this image."


def obj_placeholder(k: int) -> str:
    """``<|Obj_k|>``: the k-th object of a record, numbered from 0 in answer order."""
    return f"<|Obj_{k}|>"


def ovd_prompt(category_names: Sequence[str]) -> str:
    """OVD prompt: the category list as a JSON array (", " separators; non-ASCII names kept readable) + '.'."""
    return OVD_PROMPT_PREFIX + json.dumps(list(category_names), ensure_ascii=False) + "."


def ovd_answer(groups: Sequence[tuple[str, int]]) -> str:
    """OVD answer for (category name, object count) groups in prompt order; objects are numbered consecutively."""
    groups = [(name, n) for name, n in groups if n > 0]
    if not groups:
        return OVD_NONE_ANSWER
    parts, k = [], 0
    for name, n in groups:
        refs = ", ".join(obj_placeholder(k + i) for i in range(n))
        parts.append((name, n, refs))
        k += n
    if len(parts) == 1:
        name, n, refs = parts[0]
        verb = "is" if n == 1 else "are"
        return f'There {verb} {n} "{name}" ({refs}) in this image.'
    return "In this image, there are " + ", ".join(f'{n} "{name}" ({refs})' for name, n, refs in parts) + "."


def rec_prompt(sentence: str) -> str:
    return REC_PROMPT.format(sentence=sentence)


def rec_answer(sentence: str) -> str:
    return REC_ANSWER.format(sentence=sentence, obj=obj_placeholder(0))


def make_record(image_id: Any, image: str, prompt: str, answer_template: str, objects: list[dict], task: str) -> dict:
    """One JSONL line, fields in the released order: id, image, conversations, answer_template, objects, task."""
    return {
        "id": image_id,
        "image": image,
        "conversations": [{"from": "human", "value": prompt}],
        "answer_template": answer_template,
        "objects": objects,
        "task": task,
    }
