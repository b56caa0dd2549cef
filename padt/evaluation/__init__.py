"""Evaluation runner: samples from the released JSONL files, resumable sharded inference, metrics per task.

- `data`: evaluation samples (one per record; one per image for RIC) and their ground truth.
- `records`: prediction records and the per-rank JSONL store that makes a killed run resume.
- `distributed`: RANK / WORLD_SIZE (torchrun, accelerate) and a barrier; no DeepSpeed.
- `runner`: batched inference of one rank's shard, appending predictions as they are made.
- `coco_gt`: COCO ground truth (official annotations or the preprocessed records) and result dicts for OVD.
- `tasks`: the metrics of each task under the "standard" and "paper" protocols.
- `pipeline`: one split end to end (inference, merge, metrics.json) and the run summary.
- `table`: the printed table of a run directory.
"""
