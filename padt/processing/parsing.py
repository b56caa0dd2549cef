"""Completion parsing: token ids -> objects (label, VRT cells, positions), and the authors' entry point.

Grammar (spec 6.2/7, with the fixes of spec 12.5/12.14):

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
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from padt.processing.vrt import VRTCodec, local_to_global_cells, pid2vrt

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


# ============================================================================ features
_CPU_GRAIN = 32768  # torch runs CPU ops on more elements than this in its thread pool
_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32)


def _numpy_ok(*tensors: torch.Tensor) -> bool:
    """CPU tensors without autograd: gather them with numpy, single-threaded. torch's 2-thread parallel copies of
    a few hundred rows cost milliseconds on a contended CPU (thread wake-ups), numpy takes microseconds."""
    return all(t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES and not (t.requires_grad and torch.is_grad_enabled())
               for t in tensors)


def _take_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``x[rows]`` for a 2-D ``x`` `(N, H)` -> `(len(rows), H)`."""
    if _numpy_ok(x):
        return torch.from_numpy(x.detach().numpy()[rows] if rows else x.detach().numpy()[:0].copy())
    return x.index_select(0, torch.tensor(rows, dtype=torch.long, device=x.device))


def gather_object_features(
    hidden_states: torch.Tensor,
    objects: Sequence[Sequence[ParsedObject]],
    position_offset: int | Sequence[int] = 0,
) -> tuple[torch.Tensor, list[int], list[int]]:
    """Decoder inputs from hidden states, packed.

    Args:
        hidden_states (`torch.Tensor` of shape `(B, T, H)`): e.g. last-layer states.
        objects: per row, its parsed objects.
        position_offset (`int` or one per row): feature of completion token ``p`` is ``hidden_states[b, off + p]``.
            Use 0 for stacked generation states (step ``t`` predicted token ``t``) and ``prompt_len - 1`` for a
            teacher-forced forward over prompt + completion (the position that *predicts* each VRT).

    Returns:
        ``(features (sum n_vrt, H), vrt_lengths (N_obj,), sample_idx (N_obj,))``; split per object with
        ``features.split(vrt_lengths)``. Gradients flow to ``hidden_states``.
    """
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be (B, T, H), got {tuple(hidden_states.shape)}")
    B, T, _ = hidden_states.shape
    if len(objects) != B:
        raise ValueError(f"objects has {len(objects)} rows but hidden_states has {B}")
    offs = [int(position_offset)] * B if isinstance(position_offset, int) else [int(o) for o in position_offset]
    rows, cols, lengths, sample_idx = [], [], [], []
    for b, objs in enumerate(objects):
        off = offs[b]
        for obj in objs:
            pos = obj.positions
            if pos and (min(pos) + off < 0 or max(pos) + off >= T):
                raise ValueError(f"row {b}: object positions {pos} + offset {off} fall outside T={T}")
            cols.extend([p + off for p in pos] if off else pos)
            rows.extend([b] * len(pos))
            lengths.append(len(pos))
            sample_idx.append(b)
    if _numpy_ok(hidden_states):
        array = hidden_states.detach().numpy()
        return torch.from_numpy(array[rows, cols] if rows else array[0, :0].copy()), lengths, sample_idx
    # index_select on the flattened view: advanced indexing is far slower on small CPU batches
    flat = torch.tensor([r * T + c for r, c in zip(rows, cols)], dtype=torch.long, device=hidden_states.device)
    return hidden_states.reshape(B * T, -1).index_select(0, flat), lengths, sample_idx


def gather_object_prototypes(
    prototypes: torch.Tensor,
    objects: Sequence[Sequence[ParsedObject]],
    image_grid_thw: torch.Tensor,
    codec: VRTCodec,
    image_sample_idx: torch.Tensor | Sequence[int] | None = None,
) -> tuple[torch.Tensor, list[int], list[int]]:
    """Prototype rows of the objects' VRT cells, packed like `gather_object_features`.

    ``prototypes`` `(sum cells, H)` is the batch's VRT table (images in order); local ids of a row with several
    images are numbered across them. `ValueError` for a cell outside its row's images.
    """
    ranges = codec.row_cell_ranges(len(objects), image_grid_thw, image_sample_idx)
    flat, lengths, sample_idx = [], [], []
    for b, objs in enumerate(objects):
        for obj in objs:
            try:
                flat.extend(local_to_global_cells(ranges[b], obj.vrt_ids))
            except ValueError as err:
                raise ValueError(f"row {b}: {err}") from None
            lengths.append(len(obj.vrt_ids))
            sample_idx.append(b)
    return _take_rows(prototypes, flat), lengths, sample_idx


# ============================================================================ the authors' entry point
def _generation_rows(hidden_states, steps: list[int]) -> torch.Tensor:
    """Last-layer state of the last position of each step: `(B, len(steps), H)` from the ``[step][layer]`` layout."""
    last = [hidden_states[t][-1] for t in steps]  # each (B, L_t, H)
    B, H = last[0].shape[0], last[0].shape[-1]
    if B * len(last) * H > _CPU_GRAIN and _numpy_ok(last[0]):  # large: avoid torch's threaded copy (see _numpy_ok)
        return torch.from_numpy(np.concatenate([x.detach().numpy()[:, -1:] for x in last], axis=1))
    return torch.cat([x if x.shape[1] == 1 else x[:, -1:] for x in last], dim=1)


def parseVRTintoCompletion(  # the authors' public name
    processor,
    completion_ids,
    hidden_states,
    need_thinking_mask=None,
    image_prototype: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    *,
    image_sample_idx: torch.Tensor | Sequence[int] | None = None,
):
    """The authors' parser entry point (spec 6.2) on top of `CompletionParser`.

    Args:
        processor: `VisonTextProcessingClass` or `PaDTProcessor` (gives V, the merge size and the tokenizer).
        completion_ids (`torch.LongTensor` of shape `(B, T)`): generated ids with **local** VRT ids.
        hidden_states: generation layout ``[step][layer]`` of `(B, L_t, H)` tensors (feature of completion token
            ``t`` = ``hidden_states[t][-1][b][-1]``), or a `(B, T, H)` tensor already aligned, or None.
        need_thinking_mask: per row, parse only inside ``<answer>...</answer>``. **None means all False** (the
            original defaulted to True, which every caller overrode).
        image_prototype (`torch.Tensor` of shape `(sum cells, H)`) and image_grid_thw `(N, 3)`: if both given,
            ``vrts_feats`` holds each object's prototype rows, and VRT cells outside the row's images are dropped
            with a warning.
        image_sample_idx: row of each image (default: image ``i`` is row ``i``).

    Returns:
        ``(completions, feats, labels, vrts, vrts_feats)``, each a list per row: the decoded completion (special
        tokens and padding included), per object a `(n_vrt, H)` feature tensor (None without hidden states),
        label, concatenated VRT string, and prototype rows (None unless requested). Never raises on malformed
        output; objects parsed before a truncation are kept.
    """
    vrt_base = getattr(processor, "vrt_base_id", None) or getattr(processor, "model_embed_token_size", None)
    if vrt_base is None:
        raise TypeError(f"processor must be a VisonTextProcessingClass or PaDTProcessor (it gives the VRT base id), "
                        f"got {type(processor).__name__}")
    merge = getattr(processor, "spatial_merge_size", None) or processor.image_processor.merge_size
    parser = getattr(processor, "completion_parser", None)
    if parser is None:
        parser = CompletionParser.from_tokenizer(processor.tokenizer, vrt_base)
    rows = completion_ids.tolist() if torch.is_tensor(completion_ids) else [list(r) for r in completion_ids]
    if rows and isinstance(rows[0], int):
        rows = [rows]
    B = len(rows)
    need = [False] * B if need_thinking_mask is None else [bool(x) for x in need_thinking_mask]
    n_steps = None
    if hidden_states is not None:
        n_steps = hidden_states.shape[1] if torch.is_tensor(hidden_states) else len(hidden_states)
    ranges = None
    if image_prototype is not None and image_grid_thw is not None:
        ranges = VRTCodec(vrt_base, merge).row_cell_ranges(B, image_grid_thw, image_sample_idx)
    completions, objects = [], []
    for b, ids in enumerate(rows):
        completions.append(parser.decode(ids))
        if n_steps is not None and len(ids) > n_steps:
            warnings.warn(f"row {b}: {len(ids)} completion ids but hidden states for {n_steps} steps; "
                          f"parsing the first {n_steps}", stacklevel=2)
            ids = ids[:n_steps]
        cells = None if ranges is None else sum(c for _, c in ranges[b])
        objects.append(parser.parse(ids, need_thinking=need[b], num_cells=cells))
    labels = [[o.label for o in objs] for objs in objects]
    vrts = [[o.vrt_text for o in objs] for objs in objects]
    feats = [[None] * len(objs) for objs in objects]
    if hidden_states is not None and any(objects):
        if torch.is_tensor(hidden_states):
            packed, lengths, _ = gather_object_features(hidden_states, objects)
        else:  # gather only the VRT steps, then index them all at once
            steps = sorted({p for objs in objects for o in objs for p in o.positions})
            where = {t: i for i, t in enumerate(steps)}
            stacked = _generation_rows(hidden_states, steps)  # (B, S, H)
            packed, lengths, _ = gather_object_features(
                stacked, [[ParsedObject(o.label, o.vrt_ids, [where[p] for p in o.positions], o.text_span)
                           for o in objs] for objs in objects])
        feats = _unpack(packed.split(lengths), objects)
    vrts_feats = [[None] * len(objs) for objs in objects]
    if ranges is not None and any(objects):
        flat = [g for b, objs in enumerate(objects) for o in objs for g in local_to_global_cells(ranges[b], o.vrt_ids)]
        packed = _take_rows(image_prototype, flat)
        vrts_feats = _unpack(packed.split([len(o.vrt_ids) for objs in objects for o in objs]), objects)
    return completions, feats, labels, vrts, vrts_feats


def _unpack(pieces: Sequence[torch.Tensor], objects: Sequence[Sequence[ParsedObject]]) -> list[list[torch.Tensor]]:
    out, i = [], 0
    for objs in objects:
        out.append(list(pieces[i : i + len(objs)]))
        i += len(objs)
    return out
