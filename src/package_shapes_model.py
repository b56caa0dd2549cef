"""Package a trained shapes model as the shipped default (`padt/assets/tiny_default`): weights, processor files, a
sample scene, the training data's options and seed, and a model card with the evaluation figures.

    python src/package_shapes_model.py --run OUT/run --data OUT/data --eval OUT/eval \
        --vision-pretrain OUT/init_vision/vision_pretrain.json --out padt/assets/tiny_default

A run that started from an earlier packaged model (a continuation with a fresh schedule, not a resume) passes that
folder as `--continued-from`: its `training_log.json` is kept in front of the new run's, whose steps are shifted by
the earlier log's last step, so the shipped log covers the whole lineage.

A model trained on several generated sets (e.g. a continuation on scenes of another seed) lists them all: `--data
FIRST MORE...`. The first set gives the sample scene and the options; every set must have the same options, and
`training_data.json` then records each set's seed and counts under `training_sets`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "processor_config.json", "padt_processor.json")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="trained model folder (padt.train --output_dir)")
    ap.add_argument("--data", required=True, nargs="+",
                    help="the shapes data folder(s) it was trained on (each has manifest.json); the first gives the "
                         "sample")
    ap.add_argument("--eval", default=None, help="eval/evaluate.py --out folder of the model (metrics for the card)")
    ap.add_argument("--out", required=True, help="destination folder (its model files are replaced)")
    ap.add_argument("--vision-pretrain", default=None,
                    help="vision_pretrain.json of the run's stage 0 (OUT/init_vision), copied next to the model")
    ap.add_argument("--continued-from", default=None,
                    help="packaged model folder the run started from; its training_log.json is prepended")
    ap.add_argument("--sample", default="images/val_000000.png",
                    help="image (relative to --data) shipped as sample.png")
    args = ap.parse_args(argv)

    run, out = Path(args.run), Path(args.out)
    earlier: list[dict] = []
    if args.continued_from:
        log = Path(args.continued_from) / "training_log.json"
        if not log.is_file():
            raise SystemExit(f"--continued-from {args.continued_from} has no training_log.json")
        earlier = json.loads(log.read_text())
    data_dirs = [Path(d) for d in args.data]
    data = data_dirs[0]
    missing = [f for f in MODEL_FILES if not (run / f).is_file()]
    if missing:
        raise SystemExit(f"{run} lacks {missing}: pass the final model folder of a padt.train run")
    manifests = [json.loads((d / "manifest.json").read_text()) for d in data_dirs]
    manifest = manifests[0]
    differing = [str(d) for d, m in zip(data_dirs, manifests) if m["options"] != manifest["options"]]
    if differing:
        raise SystemExit(f"{differing} were generated with other options than {data}: one model, one scene style")
    out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copy2(run / name, out / name)
    shutil.copy2(data / args.sample, out / "sample.png")
    training_data = {k: v for k, v in manifest.items() if k != "files"}
    if len(manifests) > 1:
        training_data["training_sets"] = [
            {"seed": m["seed"], "splits": {"train": m["splits"]["train"]}} for m in manifests
        ]
    (out / "training_data.json").write_text(json.dumps(training_data, indent=1) + "\n")
    if args.vision_pretrain:
        shutil.copy2(args.vision_pretrain, out / "vision_pretrain.json")
    state = run / "trainer_state.json"
    if state.is_file():
        history = json.loads(state.read_text())["log_history"]
        offset = earlier[-1]["step"] if earlier else 0
        entries = earlier + [{**e, "step": e["step"] + offset} for e in history if "loss_ce" in e]
        (out / "training_log.json").write_text(json.dumps(entries) + "\n")
    if args.eval:
        from padt.evaluation.table import format_table, load_summary

        table = format_table(load_summary(args.eval))
        (out / "metrics.txt").write_text(table + "\n")
    print(f"packaged {run} into {out}")


if __name__ == "__main__":
    main()
