"""Batched inference of one rank's shard of samples, appending predictions as they are made (resumable)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from padt.evaluation.data import EvalSample
from padt.evaluation.records import PredictionStore, prediction_record


def shard(samples: Sequence[EvalSample], rank: int, world_size: int) -> list[EvalSample]:
    """Rank r's samples: positions r, r + W, r + 2W, ... (interleaved, so that ranks get similar work)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    return list(samples[rank::world_size])


@dataclass
class InferenceStats:
    """Samples of this rank's shard: already done before the run, generated now."""

    shard_size: int
    skipped: int
    generated: int


def pending_samples(samples: Sequence[EvalSample], store: PredictionStore, rank: int, world_size: int
                    ) -> list[EvalSample]:
    """This rank's samples without a prediction in any rank file."""
    done = store.done_indices()
    return [s for s in shard(samples, rank, world_size) if s.index not in done]


def run_inference(
    predictor,
    samples: Sequence[EvalSample],
    store: PredictionStore,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    on_batch: Callable[[list[dict]], None] | None = None,
) -> InferenceStats:
    """Predict this rank's pending samples in batches and append each batch's records to `store`.

    Args:
        predictor: anything with ``predict(images: list, prompts: list[str]) -> list[Prediction]`` (a
            `padt.inference.predictor.PaDTPredictor`, batched with left padding), or a zero-argument callable
            returning one (called only if something is pending, so a finished run never loads the model).
        samples: every sample of the split (the shard is taken here).
        on_batch: called with each batch's records after they are written.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    store.repair()
    mine = shard(samples, rank, world_size)
    todo = pending_samples(samples, store, rank, world_size)
    stats = InferenceStats(len(mine), len(mine) - len(todo), 0)
    if not todo:
        return stats
    missing = [s for s in todo if not s.image_path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) not found, e.g. {missing[0].image_path} "
                                f"(sample {missing[0].index}); check --images")
    if not hasattr(predictor, "predict") and callable(predictor):
        predictor = predictor()
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), initial=stats.skipped, disable=not progress, desc=f"predict rank {rank}",
               position=rank, unit="sample", dynamic_ncols=True)
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            preds = predictor.predict([s.image_path for s in batch], [s.prompt for s in batch])
            if len(preds) != len(batch):
                raise RuntimeError(f"predictor returned {len(preds)} predictions for a batch of {len(batch)}")
            records = [prediction_record(s, p) for s, p in zip(batch, preds)]
            store.append(records)
            stats.generated += len(records)
            bar.update(len(records))
            if on_batch is not None:
                on_batch(records)
    finally:
        bar.close()
    return stats
