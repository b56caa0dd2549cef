"""Referring expressions of the shapes benchmark: their grammar, their meaning, and how a scene's objects get one.

Grammar (:class:`Expression`): ``the [larger|smaller] COLOUR KIND [on the left|on the right|at the top|at the
bottom]``. Meaning (:func:`referents`): the objects of that colour and kind that hold the relation, with a clear margin,
against every other object of that colour and kind. :func:`describe` picks an expression whose only referent is a
given object; every generated expression has exactly one referent. See docs/shapes.md.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from padt.shapes.options import KINDS, PALETTE, ShapesConfig

POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
SIZE_RELATIONS = ("larger", "smaller")
RELATIONS = tuple(POSITION_PHRASES) + SIZE_RELATIONS


@dataclass(frozen=True)
class ObjectFacts:
    """What the referring-expression semantics look at: names, visible box centre (px) and visible area (px)."""

    colour: str
    kind: str
    cx: float
    cy: float
    area: float


@dataclass(frozen=True)
class Expression:
    """``the [larger|smaller] COLOUR KIND [on the left|on the right|at the top|at the bottom]``."""

    colour: str
    kind: str
    relation: str | None = None

    def text(self) -> str:
        if self.relation is None:
            return f"the {self.colour} {self.kind}"
        if self.relation in SIZE_RELATIONS:
            return f"the {self.relation} {self.colour} {self.kind}"
        if self.relation in POSITION_PHRASES:
            return f"the {self.colour} {self.kind} {POSITION_PHRASES[self.relation]}"
        raise ValueError(f"unknown relation {self.relation!r}; expected one of {RELATIONS}")


_EXPRESSION = re.compile(
    r"^the (?:(?P<size>larger|smaller) )?(?P<colour>[a-z]+) (?P<kind>[a-z]+)"
    r"(?: (?P<pos>" + "|".join(POSITION_PHRASES.values()) + r"))?$"
)


def parse_expression(text: str) -> Expression:
    """Inverse of :meth:`Expression.text`; ValueError for a sentence outside the grammar."""
    m = _EXPRESSION.match(text)
    if m is None or m["colour"] not in PALETTE or m["kind"] not in KINDS or (m["size"] and m["pos"]):
        raise ValueError(f"not a shapes referring expression: {text!r}")
    relation = m["size"] or {v: k for k, v in POSITION_PHRASES.items()}.get(m["pos"])
    return Expression(m["colour"], m["kind"], relation)


def _beats(a: ObjectFacts, b: ObjectFacts, relation: str, margin_x: float, margin_y: float, ratio: float) -> bool:
    """Does ``a`` hold ``relation`` against ``b`` with a clear margin?"""
    if relation == "left":
        return b.cx - a.cx >= margin_x
    if relation == "right":
        return a.cx - b.cx >= margin_x
    if relation == "top":
        return b.cy - a.cy >= margin_y
    if relation == "bottom":
        return a.cy - b.cy >= margin_y
    if relation == "larger":
        return a.area >= ratio * b.area
    if relation == "smaller":
        return b.area >= ratio * a.area
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def referents(expr: Expression, facts: Sequence[ObjectFacts], config: ShapesConfig) -> list[int]:
    """Indices of the objects an expression picks: those of its colour and kind, and, with a relation, the ones that
    hold it against every other object of that colour and kind (margins from ``config``)."""
    same = [i for i, f in enumerate(facts) if f.colour == expr.colour and f.kind == expr.kind]
    if expr.relation is None:
        return same
    mx, my = config.position_margin * config.width, config.position_margin * config.height
    return [i for i in same
            if all(_beats(facts[i], facts[j], expr.relation, mx, my, config.size_ratio) for j in same if j != i)]


def describe(i: int, facts: Sequence[ObjectFacts], config: ShapesConfig, rng: np.random.Generator) -> Expression | None:
    """An expression whose only referent is object ``i``: ``the COLOUR KIND`` when that is unique, else a random
    relation among those that single it out; None if none does."""
    plain = Expression(facts[i].colour, facts[i].kind)
    if referents(plain, facts, config) == [i]:
        return plain
    valid = [Expression(plain.colour, plain.kind, r) for r in RELATIONS]
    valid = [e for e in valid if referents(e, facts, config) == [i]]
    return valid[int(rng.integers(len(valid)))] if valid else None
