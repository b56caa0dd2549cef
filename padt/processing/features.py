"""The decoder's inputs: per object, the hidden states at its VRT positions or the prototypes of its VRT cells.

One gatherer serves inference and training (docs/method.md#the-decoder):

- `gather_positions` / `gather_rows` are the core: hidden states ``hidden[b, offset + p]`` at the objects' token
  positions, or rows of a 2-D table (the batch's prototypes) at global cells; both return the objects' features packed
  `(sum n_vrt, H)` with one length per object.
- `gather_object_features` / `gather_object_prototypes` apply them to parsed completions (`ParsedObject`); the
  training step (`padt.train.step.object_features`) applies them to the collator's object dicts.
- `unpack_per_object` turns packed features back into the nested per-sample, per-object lists `vl_decode` takes.

Gradients flow to the gathered tensor. CPU tensors without autograd are gathered with numpy (see `numpy_gather_ok`).
"""

from __future__ import annotations

from collections.abc import Sequence, Sized

import torch

from padt.processing.parsing import ParsedObject
from padt.processing.vrt import VRTCodec, local_to_global_cells

__all__ = [
    "gather_object_features",
    "gather_object_prototypes",
    "gather_positions",
    "gather_rows",
    "numpy_gather_ok",
    "unpack_per_object",
]

_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32)


def numpy_gather_ok(*tensors: torch.Tensor) -> bool:
    """CPU tensors without autograd: gather them with numpy, single-threaded. torch's 2-thread parallel copies of
    a few hundred rows cost milliseconds on a contended CPU (thread wake-ups), numpy takes microseconds."""
    return all(t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES and not (t.requires_grad and torch.is_grad_enabled())
               for t in tensors)


def gather_rows(x: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """``x[rows]`` for a 2-D ``x`` `(N, H)` -> `(len(rows), H)` (rows may repeat)."""
    rows = list(rows)
    if numpy_gather_ok(x):
        array = x.detach().numpy()
        return torch.from_numpy(array[rows] if rows else array[:0].copy())
    return x[torch.tensor(rows, dtype=torch.long, device=x.device)]


def gather_positions(
    hidden_states: torch.Tensor,
    positions: Sequence[Sequence[Sequence[int]]],
    position_offset: int | Sequence[int] = 0,
) -> tuple[torch.Tensor, list[int], list[int]]:
    """Hidden states at the objects' token positions, packed.

    Args:
        hidden_states (`torch.Tensor` of shape `(B, T, H)`).
        positions: per row, per object, its token positions ``p`` (completion indices).
        position_offset (`int` or one per row): the feature of position ``p`` of row ``b`` is
            ``hidden_states[b, offset + p]``.

    Returns:
        ``(features (sum n_vrt, H), lengths (N_obj,), sample_idx (N_obj,))``. `ValueError` for a position outside
        ``T`` or a ``positions`` with another number of rows than ``hidden_states``.
    """
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be (B, T, H), got {tuple(hidden_states.shape)}")
    B, T, _ = hidden_states.shape
    if len(positions) != B:
        raise ValueError(f"objects has {len(positions)} rows but hidden_states has {B}")
    offs = [int(position_offset)] * B if isinstance(position_offset, int) else [int(o) for o in position_offset]
    rows, cols, lengths, sample_idx = [], [], [], []
    for b, row_positions in enumerate(positions):
        off = offs[b]
        for pos in row_positions:
            if pos and (min(pos) + off < 0 or max(pos) + off >= T):
                raise ValueError(f"row {b}: object positions {list(pos)} + offset {off} fall outside T={T}")
            cols.extend([p + off for p in pos] if off else pos)
            rows.extend([b] * len(pos))
            lengths.append(len(pos))
            sample_idx.append(b)
    if numpy_gather_ok(hidden_states):
        array = hidden_states.detach().numpy()
        return torch.from_numpy(array[rows, cols] if rows else array[0, :0].copy()), lengths, sample_idx
    device = hidden_states.device
    index = (torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(cols, dtype=torch.long, device=device))
    return hidden_states[index], lengths, sample_idx


def unpack_per_object(packed: torch.Tensor, lengths: Sequence[int],
                      objects: Sequence[Sized]) -> list[list[torch.Tensor]]:
    """Packed features `(sum n_vrt, H)` -> per sample, per object `(n_vrt, H)` views, nested like ``objects`` (any
    per-sample sequences whose lengths are the samples' object counts, in the order the features were packed)."""
    pieces = packed.split(list(lengths)) if lengths else ()
    out, i = [], 0
    for objs in objects:
        out.append(list(pieces[i : i + len(objs)]))
        i += len(objs)
    return out


def gather_object_features(
    hidden_states: torch.Tensor,
    objects: Sequence[Sequence[ParsedObject]],
    position_offset: int | Sequence[int] = 0,
) -> tuple[torch.Tensor, list[int], list[int]]:
    """Decoder inputs of parsed objects from hidden states, packed.

    Args:
        hidden_states (`torch.Tensor` of shape `(B, T, H)`): e.g. last-layer states.
        objects: per row, its parsed objects.
        position_offset (`int` or one per row): feature of completion token ``p`` is ``hidden_states[b, off + p]``.
            Use 0 for stacked generation states (step ``t`` predicted token ``t``) and ``prompt_len - 1`` for a
            teacher-forced forward over prompt + completion (the position that *predicts* each VRT).

    Returns:
        ``(features (sum n_vrt, H), vrt_lengths (N_obj,), sample_idx (N_obj,))``; nest them per object with
        `unpack_per_object`. Gradients flow to ``hidden_states``.
    """
    positions = [[obj.positions for obj in objs] for objs in objects]
    return gather_positions(hidden_states, positions, position_offset)


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
    return gather_rows(prototypes, flat), lengths, sample_idx
