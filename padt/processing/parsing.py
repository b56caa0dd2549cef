"""Completion parsing: token ids -> objects (label, VRT cells, positions).

Grammar (docs/method.md#parsing-completions; the answer formats are docs/method.md#tasks-and-prompts). It fixes the
authors' ``parseVRTintoCompletion`` (``src/PaDT/models/padt_processor.py``) where it lost objects or leaked labels
(docs/method.md#where-padt-differs-from-the-authors-code):

- Parsing stops at the first eos id; a truncated completion yields the objects parsed so far.
- A maximal run of consecutive VRT ids (``id >= V``, pure arithmetic) is one object.
- **Label rule.** An object's label is the last complete quoted string in the text between the previous VRT run
  (or the start) and this run. If there is none and that text holds only separators (whitespace, commas), the
  object inherits the previous object's label (OVD: ``2 "person" (<run>, <run>)`` -> both "person"); otherwise
  the label is "" (RIC captions without quotes). Labels never leak further than that, and an unterminated quote
  gives no label.
- Optional ``need_thinking``: only the text between ``<answer>`` and ``</answer>`` is parsed (no tag -> nothing).
- Nothing raises on malformed model output (negative ids are a caller error and raise `ValueError`).

Speed: one precomputed id -> bytes table (`build_token_table`) replaces per-token decode calls; VRT detection is
``id >= V``; text is only joined between runs. See ``bench/bench_parse.py``.

The objects' decoder inputs are gathered by `padt.processing.features`; the authors' entry point
``parseVRTintoCompletion`` is in `padt.legacy`.
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from padt.processing.vrt import pid2vrt

_SEPARATORS = b" \t\r\n,"


@dataclass(slots=True)
class ParsedObject:
    """One object of a completion.

    Attributes:
        label (`str`): see the label rule in the module docstring ("" when there is none).
        vrt_ids (`list[int]`): local cell indices (``id - V``) of the object's VRT run, in order.
        positions (`list[int]`): indices of those tokens in the completion.
        text_span (`tuple[int, int]`): token range ``[start, end)`` of the text before the run (label context).
    """

    label: str
    vrt_ids: list[int]
    positions: list[int]
    text_span: tuple[int, int]

    @property
    def vrt_text(self) -> str:
        return pid2vrt(self.vrt_ids)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level alphabet: byte -> printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_LEVEL_TRANSLATION = {ord(c): b for b, c in _bytes_to_unicode().items()}


def build_token_table(tokenizer, vrt_base_id: int | None = None) -> list[bytes]:
    """Bytes of every id ``< V`` (default V = ``len(tokenizer)``), computed once.

    Byte-level BPE tokens map through the byte alphabet (exact bytes, so labels split inside a UTF-8 character
    still decode right); added tokens give their content; other tokenizers fall back to ``decode([id])``.
    Ids without a token (e.g. the `<|empty_token_*|>` gap up to V) give ``b""``.
    """
    n = len(tokenizer)
    size = n if vrt_base_id is None else int(vrt_base_id)
    added = {i: getattr(t, "content", str(t)) for i, t in tokenizer.added_tokens_decoder.items()}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and "ByteLevel" in str(backend.decoder)
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(n, size))))
    table: list[bytes] = []
    for i, tok in enumerate(tokens):
        if i in added:
            table.append(added[i].encode("utf-8"))
        elif tok is None:
            table.append(b"")
        elif byte_level:
            mapped = tok.translate(_BYTE_LEVEL_TRANSLATION)
            try:
                table.append(mapped.encode("latin-1"))
            except UnicodeEncodeError:  # a character outside the byte alphabet: not a byte-level token
                table.append(tokenizer.decode([i]).encode("utf-8"))
        else:
            table.append(tokenizer.decode([i]).encode("utf-8"))
    table.extend([b""] * (size - len(table)))
    return table


class _LazyTable:
    """Token table filled on demand from ``decode_fn([id]) -> str``."""

    def __init__(self, decode_fn: Callable[[list[int]], str]):
        self._fn, self._cache = decode_fn, {}

    def __getitem__(self, i: int) -> bytes:
        b = self._cache.get(i)
        if b is None:
            b = self._cache[i] = self._fn([i]).encode("utf-8")
        return b


class CompletionParser:
    """Fast parser over token ids.

    Args:
        token_table: bytes of each id ``< V`` (`build_token_table`), or any object indexable that way.
        vrt_base_id (`int`): V; ids ``>= V`` are VRTs (local cell ``id - V``).
        eos_token_id (`int` or list of `int`, *optional*): parsing stops at the first of these.
    """

    def __init__(self, token_table, vrt_base_id: int, eos_token_id: int | Sequence[int] | None = None):
        self.table = token_table
        self.vrt_base_id = int(vrt_base_id)
        if eos_token_id is None:
            self.eos_ids: tuple[int, ...] = ()
        elif isinstance(eos_token_id, int):
            self.eos_ids = (eos_token_id,)
        else:
            self.eos_ids = tuple(int(e) for e in eos_token_id)

    @classmethod
    def from_tokenizer(cls, tokenizer, vrt_base_id: int, eos_token_id: int | Sequence[int] | None = None):
        """Build the table from ``tokenizer``; eos defaults to ``tokenizer.eos_token_id``."""
        eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        return cls(build_token_table(tokenizer, vrt_base_id), vrt_base_id, eos)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Ids -> text with special tokens and `<|VRT_k|>`; no eos cut (the authors' ``completions`` string)."""
        V, table = self.vrt_base_id, self.table
        return b"".join([table[t] if 0 <= t < V else b"<|VRT_%d|>" % (t - V) for t in token_ids]).decode(
            "utf-8", "replace"
        )

    def _answer_span(self, ids: list[int], start: int, end: int) -> tuple[int, int]:
        V, table = self.vrt_base_id, self.table
        offs = [0]
        for t in ids[start:end]:
            offs.append(offs[-1] + (len(table[t]) if t < V else 0))
        text = b"".join(table[t] for t in ids[start:end] if t < V)
        a = text.find(b"<answer>")
        if a < 0:
            return end, end
        a_end = a + len(b"<answer>")
        s = start + bisect.bisect_left(offs, a_end)
        c = text.find(b"</answer>", a_end)
        # end before the token that starts the closing tag (zero-byte VRT tokens right before it stay in)
        e = end if c < 0 else start + bisect.bisect_right(offs, c) - 1
        return s, max(s, e)

    def parse(self, token_ids: Sequence[int], *, need_thinking: bool = False,
              num_cells: int | None = None) -> list[ParsedObject]:
        """Objects of one completion (list of ids; a tensor is converted).

        Args:
            need_thinking (`bool`): parse only between ``<answer>`` and ``</answer>``.
            num_cells (`int`, *optional*): cells of the row's image(s); VRT ids ``>= num_cells`` are removed from
                their object with a warning (an object left with none is dropped, also with a warning).
        """
        ids = token_ids if type(token_ids) is list else (
            token_ids.tolist() if torch.is_tensor(token_ids) else list(token_ids))
        V, table = self.vrt_base_id, self.table
        end = len(ids)
        for e in self.eos_ids:
            try:
                end = ids.index(e, 0, end)
            except ValueError:
                pass
        start = 0
        if need_thinking:
            start, end = self._answer_span(ids, 0, end)
        sub = ids[start:end] if start or end < len(ids) else ids
        if sub and min(sub) < 0:
            raise ValueError(f"token ids must be >= 0, got {min(sub)} (pass completion ids, not labels)")
        flags = bytes(map(V.__le__, sub))  # 1 at VRT positions; runs are found by C-level bytes.find
        find, get = flags.find, table.__getitem__
        objects: list[ParsedObject] = []
        prev: str | None = None
        seg_start = pos = 0
        while (a := find(1, pos)) >= 0:
            b = find(0, a)
            if b < 0:
                b = len(flags)
            seg = b"".join(map(get, sub[seg_start:a]))
            q = seg.count(b'"')
            if q >= 2:  # label rule (module docstring)
                last = seg.rfind(b'"')
                if q & 1:
                    last = seg.rfind(b'"', 0, last)
                first = seg.rfind(b'"', 0, last)
                label = seg[first + 1 : last].decode("utf-8", "replace").strip()
            elif prev is not None and not seg.strip(_SEPARATORS):
                label = prev
            else:
                label = ""
            obj = ParsedObject(label, [t - V for t in sub[a:b]], list(range(start + a, start + b)),
                               (start + seg_start, start + a))
            if num_cells is not None:
                obj = _drop_invalid(obj, num_cells)
            if obj is not None:
                objects.append(obj)
            prev, seg_start, pos = label, b, b
        return objects

    def parse_batch(self, token_ids, *, need_thinking_mask: Sequence[bool] | torch.Tensor | None = None,
                    num_cells: Sequence[int] | None = None) -> list[list[ParsedObject]]:
        """`parse` for each row of ``token_ids`` `(B, T)` (tensor or list of lists; padding after eos is ignored)."""
        rows = token_ids.tolist() if torch.is_tensor(token_ids) else token_ids
        need = [False] * len(rows) if need_thinking_mask is None else [bool(x) for x in need_thinking_mask]
        cells = [None] * len(rows) if num_cells is None else list(num_cells)
        if len(need) != len(rows) or len(cells) != len(rows):
            raise ValueError(f"need_thinking_mask/num_cells must have one entry per row ({len(rows)})")
        return [self.parse(r, need_thinking=nt, num_cells=c) for r, nt, c in zip(rows, need, cells)]


def _drop_invalid(obj: ParsedObject, num_cells: int) -> ParsedObject | None:
    keep = [i for i, k in enumerate(obj.vrt_ids) if k < num_cells]
    if len(keep) == len(obj.vrt_ids):
        return obj
    bad = [obj.vrt_ids[i] for i in range(len(obj.vrt_ids)) if i not in keep]
    warnings.warn(f"VRT cell(s) {bad} of object {obj.label!r} are outside the image(s) ({num_cells} cells); "
                  f"{'removed' if keep else 'object dropped'}", stacklevel=3)
    if not keep:
        return None
    return ParsedObject(obj.label, [obj.vrt_ids[i] for i in keep], [obj.positions[i] for i in keep], obj.text_span)


def parse_completion(
    token_ids: Sequence[int] | torch.Tensor,
    *,
    vrt_base_id: int,
    eos_token_id: int | Sequence[int] | None = None,
    token_table: Sequence[bytes] | None = None,
    decode_fn: Callable[[list[int]], str] | None = None,
    need_thinking: bool = False,
    num_cells: int | None = None,
) -> list[ParsedObject]:
    """Parse one completion. Give ``token_table`` (fast; `build_token_table`) or ``decode_fn([id]) -> str``.

    For many completions build one `CompletionParser` and reuse it.
    """
    return _make_parser(vrt_base_id, eos_token_id, token_table, decode_fn).parse(
        token_ids, need_thinking=need_thinking, num_cells=num_cells
    )


def parse_completions(
    token_ids,
    *,
    vrt_base_id: int,
    eos_token_id: int | Sequence[int] | None = None,
    token_table: Sequence[bytes] | None = None,
    decode_fn: Callable[[list[int]], str] | None = None,
    need_thinking_mask: Sequence[bool] | None = None,
    num_cells: Sequence[int] | None = None,
) -> list[list[ParsedObject]]:
    """Batch version of `parse_completion` over ``token_ids`` `(B, T)`."""
    return _make_parser(vrt_base_id, eos_token_id, token_table, decode_fn).parse_batch(
        token_ids, need_thinking_mask=need_thinking_mask, num_cells=num_cells
    )


def _make_parser(vrt_base_id, eos_token_id, token_table, decode_fn) -> CompletionParser:
    if token_table is None and decode_fn is None:
        raise ValueError("pass token_table (build_token_table(tokenizer, V)) or decode_fn")
    return CompletionParser(token_table if token_table is not None else _LazyTable(decode_fn), vrt_base_id,
                            eos_token_id)
