"""The steps of the tiny shapes recipe (docs/shapes.md, "The tiny shapes model") and of its ablations, from
configs/shapes/recipe.yaml and configs/shapes/ablations.yaml.

    python src/shapes_recipe.py STEP OUTPUT_DIR [extra padt.train flags]   # STEP: data, init, stage0, train, eval
    python src/shapes_recipe.py ablations OUTPUT_DIR [extra padt.train flags]
    python src/shapes_recipe.py usage [sft | ablations]

run_scripts/padt_tiny_shapes_sft.sh runs the five steps in order, run_scripts/padt_tiny_shapes_ablations.sh the
ablations. Each step calls the command-line entry points (src/preprocess/make_shapes.py, python -m
padt.testing.models, src/pretrain_shapes_vision.py, python -m padt.train, eval/evaluate.py) with the settings of the
config, where the environment variable named like a top-level key in capitals overrides the key. Every step checks
all the settings before it does anything (`error: ...`, exit status 2), skips what an earlier run finished, and
prints each command it runs (`+ ...` on stderr); with DRY_RUN=1 it only prints them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "shapes" / "recipe.yaml"
ABLATIONS = ROOT / "configs" / "shapes" / "ablations.yaml"
FREE_TEXT = ("extra_data_dirs", "init_flags", "eval_flags")  # settings for which an empty variable counts
TASKS = ("refer", "ovd", "ric")  # the training files of a set: {task}_train.jsonl
CELL_CLASS_MATCH = {"kind": "exact", "colour_kind": "phrase"}  # how object labels name the classes
EVAL_TASKS = (("rec", "refer_val.jsonl", None), ("res", "refer_val.jsonl", None),  # one generation, scored twice
              ("ovd", "ovd_val.jsonl", "coco_val.json"), ("ric", "ric_val.jsonl", None))
POSITIVE, WHOLE = re.compile(r"[1-9][0-9]*"), re.compile(r"0|[1-9][0-9]*")


class RecipeError(ValueError):
    """A setting the recipe cannot run with; reported as `error: ...` with exit status 2."""


# ============================================================================ settings
def read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def is_set(key: str, environ: Mapping[str, str]) -> bool:
    """Whether the environment sets `key` (its variable KEY; an empty one counts only for the FREE_TEXT keys)."""
    value = environ.get(key.upper())
    return value is not None and (value != "" or key in FREE_TEXT)


def overridden(defaults: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """`defaults` with each top-level scalar that the environment sets replaced by its variable's value."""
    return {key: environ[key.upper()] if not isinstance(value, dict) and is_set(key, environ) else value
            for key, value in defaults.items()}


def is_zero(value: Any) -> bool:
    try:
        return float(value) == 0
    except (TypeError, ValueError):
        return False


def load_settings(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The recipe's settings (config + environment), checked; `RecipeError` for the first that cannot work."""
    from padt.shapes import CELL_CLASS_SETS

    s = overridden(read_yaml(RECIPE), environ)
    if s["batch"] in (None, ""):
        s["batch"] = read_yaml(ROOT / s["train_config"])["per_device_train_batch_size"]
    nproc, batch = str(s["nproc"]), str(s["batch"])
    if not (POSITIVE.fullmatch(nproc) and POSITIVE.fullmatch(batch)) or int(batch) % int(nproc):
        raise RecipeError(f"BATCH ({batch}) must be a positive multiple of NPROC ({nproc}), the number of training "
                          "processes")
    if not POSITIVE.fullmatch(str(s["omp_num_threads"])):
        raise RecipeError(f"OMP_NUM_THREADS must be a positive whole number, got '{s['omp_num_threads']}'")
    for key in ("cell_classes", "vision_classes"):
        if s[key] not in CELL_CLASS_SETS:
            raise RecipeError(f"{key.upper()} must be kind or colour_kind, got '{s[key]}'")
    for task in TASKS:
        if not WHOLE.fullmatch(str(s[f"{task}_repeat"])):
            raise RecipeError(f"{task.upper()}_REPEAT must be a whole number of copies (0 leaves the task out), got "
                              f"'{s[f'{task}_repeat']}'")
    if all(int(s[f"{task}_repeat"]) == 0 for task in TASKS):
        raise RecipeError("REFER_REPEAT, OVD_REPEAT and RIC_REPEAT are all 0: no training data left")
    return s


def option_flags(options: Mapping[str, Any]) -> list[str]:
    """A config mapping -> command-line flags: `key: true` -> --key, a list -> --key a b, else --key value."""
    flags: list[str] = []
    for key, value in options.items():
        if value is True:
            flags.append(f"--{key}")
        elif isinstance(value, list):
            flags += [f"--{key}", *map(str, value)]
        elif value is not None and value is not False:
            flags += [f"--{key}", str(value)]
    return flags


# ============================================================================ files and commands
def data_dir(s: Mapping[str, Any], out: str) -> str:
    return str(s["data_dir"]) if s["data_dir"] else os.path.join(out, "data")


def manifest(folder: str) -> dict[str, Any]:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise RecipeError(f"{folder} has no manifest.json (EXTRA_DATA_DIRS must hold generated shapes sets)")
    return json.loads(path.read_text())


def training_sets(s: Mapping[str, Any], out: str) -> tuple[list[str], str]:
    """The training sets (DATA_DIR, then EXTRA_DATA_DIRS) and their scenes' pixel count, checked to be one."""
    data = data_dir(s, out)
    pixels = str(manifest(data)["processor"]["max_pixels"])
    sets = [data, *str(s["extra_data_dirs"]).split()]
    for folder in sets:
        set_pixels = str(manifest(folder)["processor"]["max_pixels"])
        if set_pixels != pixels:
            raise RecipeError(f"{folder} has {set_pixels}-pixel scenes, {data} has {pixels}: one image size per model")
    return sets, pixels


def run(cmd: list[str], env: Mapping[str, str] | None = None, dry_run_too: bool = False) -> None:
    """Print the command (`+ ...` on stderr) with the variables it gets in `env`, and run it (unless DRY_RUN=1 and not
    `dry_run_too`: a command that honours DRY_RUN itself); a failure ends the recipe with its status."""
    env = dict(env or {})
    print("+", *(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd), file=sys.stderr, flush=True)
    if os.environ.get("DRY_RUN", "0") == "1" and not dry_run_too:
        return
    code = subprocess.run(cmd, env={**os.environ, **env}, check=False).returncode
    if code:
        sys.exit(code)


# ============================================================================ the steps
def make_data(s: dict[str, Any], out: str, flags: list[str]) -> None:
    """1. The synthetic scenes (DATA_DIR, default OUTPUT_DIR/data) unless they are there; every set is checked."""
    data = data_dir(s, out)
    if not (Path(data) / "manifest.json").is_file():
        run([sys.executable, str(ROOT / "src" / "preprocess" / "make_shapes.py"), "--out", data,
             "--num-images", str(s["num_images"]), "--num-val-images", str(s["num_val"]), "--seed", str(s["seed"])])
    if os.environ.get("DRY_RUN", "0") != "1":
        training_sets(s, out)


def build_model(s: dict[str, Any], out: str, flags: list[str]) -> None:
    """2. The tiny random model (OUTPUT_DIR/init), for the data's image size."""
    if not (Path(out) / "init" / "config.json").is_file():
        _, pixels = training_sets(s, out)
        run([sys.executable, "-m", "padt.testing.models", "--out", os.path.join(out, "init"),
             *option_flags(s["model"]), "--min-pixels", pixels, "--max-pixels", pixels, *str(s["init_flags"]).split()])


def pretrain_vision(s: dict[str, Any], out: str, flags: list[str]) -> None:
    """3. Stage 0 (OUTPUT_DIR/init_vision) unless VISION_STEPS is 0; a rerun resumes it or reuses its result."""
    if is_zero(s["vision_steps"]) or (Path(out) / "init_vision" / "vision_pretrain.json").is_file():
        return
    sets, _ = training_sets(s, out)
    run([sys.executable, str(ROOT / "src" / "pretrain_shapes_vision.py"), "--model", os.path.join(out, "init"),
         "--data", *sets, "--out", os.path.join(out, "init_vision"), "--steps", str(s["vision_steps"]),
         "--cell-classes", str(s["vision_classes"]), *option_flags(s["vision_pretrain"])])


def train(s: dict[str, Any], out: str, flags: list[str]) -> None:
    """4. PaDT training (OUTPUT_DIR/run; a rerun resumes): every set's task files, each *_REPEAT times, in NPROC
    processes of OMP_NUM_THREADS / NPROC threads and BATCH / NPROC samples each; `flags` come last and win."""
    from padt.shapes import cell_class_names

    sets, pixels = training_sets(s, out)
    files, folders = [], []
    for folder in sets:
        for task in TASKS:
            copies = int(s[f"{task}_repeat"])
            files += [os.path.join(folder, f"{task}_train.jsonl")] * copies
            folders += [os.path.join(folder, "images")] * copies
    cell_flags = []
    if not is_zero(s["cell_class_coef"]):
        names = cell_class_names(manifest(sets[0])["options"], s["cell_classes"])
        cell_flags = ["--cell_class_loss_coef", str(s["cell_class_coef"]), "--cell_class_names", *names,
                      "--cell_class_match", CELL_CLASS_MATCH[s["cell_classes"]]]
    nproc, threads = int(s["nproc"]), int(s["omp_num_threads"])
    launcher = [sys.executable, "-m", "padt.train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                    "-m", "padt.train", "--ddp_backend", "gloo"]
    start = "init" if is_zero(s["vision_steps"]) else "init_vision"
    run([*launcher, "--config", str(ROOT / s["train_config"]),
         "--per_device_train_batch_size", str(int(s["batch"]) // nproc),
         "--model_name_or_path", os.path.join(out, start), "--data_file_paths", ":".join(files),
         "--image_folders", ":".join(folders), "--output_dir", os.path.join(out, "run"),
         "--min_pixels", pixels, "--max_pixels", pixels, *cell_flags, *flags],
        {"OMP_NUM_THREADS": str(threads // nproc if threads > nproc else 1)})


def evaluate(s: dict[str, Any], out: str, flags: list[str]) -> None:
    """5. The four tasks on the held-out scenes (OUTPUT_DIR/eval), then their table; nothing when EVAL is 0."""
    if is_zero(s["eval"]):
        return
    data = data_dir(s, out)
    limit = [] if is_zero(s["eval_limit"]) else ["--limit", str(s["eval_limit"])]
    for task, records, coco_gt in EVAL_TASKS:
        gt = ["--annotations", os.path.join(data, coco_gt)] if coco_gt else []
        run([sys.executable, str(ROOT / "eval" / "evaluate.py"), "--model", os.path.join(out, "run"), "--task", task,
             "--data", os.path.join(data, records), "--images", os.path.join(data, "images"), *gt,
             "--out", os.path.join(out, "eval"), *option_flags(s["evaluate"]), *str(s["eval_flags"]).split(), *limit])
    run([sys.executable, "-m", "padt.evaluation.table", os.path.join(out, "eval")])


STEPS = {"data": make_data, "init": build_model, "stage0": pretrain_vision, "train": train, "eval": evaluate}


def ablations(out: str, flags: list[str], environ: Mapping[str, str] = os.environ) -> None:
    """Each variant (VARIANTS, default all) with run_scripts/padt_tiny_shapes_sft.sh in OUTPUT_DIR/<variant> on the
    shared OUTPUT_DIR/data, then their metrics side by side (unless EVAL=0)."""
    config = read_yaml(ABLATIONS)
    a = overridden(config, environ)
    names = environ.get("VARIANTS") or " ".join(config["variants"])
    unknown = [name for name in names.split() if name not in config["variants"]]
    if unknown:
        raise RecipeError(f"unknown variant '{unknown[0]}' ({', '.join(config['variants'])})")
    env = {key.upper(): "" if value is None else str(value)  # the ablations' recipe, where the user set nothing
           for key, value in config["recipe"].items() if not is_set(key, environ)}
    steps = str(a["max_steps"])
    table = []
    for name in names.split():
        variant = config["variants"][name] or {}
        run(["bash", str(ROOT / "run_scripts" / "padt_tiny_shapes_sft.sh"), os.path.join(out, name),
             "--max_steps", steps, "--save_steps", steps, "--learning_rate", str(a["learning_rate"]),
             "--decoder_lr_scale", str(a["decoder_lr_scale"]), *str(variant.get("train_flags", "")).split(), *flags],
            {**env, "DATA_DIR": os.path.join(out, "data"), "INIT_FLAGS": str(variant.get("init_flags", "")),
             "PYTHON": sys.executable}, dry_run_too=True)
        table.append(f"{name}={os.path.join(out, name, 'eval')}")
    if not is_zero(environ.get("EVAL") or 1):
        run([sys.executable, "-m", "padt.evaluation.table", *table])


# ============================================================================ usage
SFT_USAGE = """\
Usage: bash run_scripts/padt_tiny_shapes_sft.sh OUTPUT_DIR [extra padt.train flags]

Trains the tiny PaDT shapes model from scratch on CPU and evaluates it (docs/shapes.md), in five steps
(src/shapes_recipe.py STEP), every value from configs/shapes/recipe.yaml:
1. data: generates the synthetic shapes data set (OUTPUT_DIR/data: NUM_IMAGES training scenes, NUM_VAL held-out
   scenes from a separate random stream), unless it is there already;
2. init: builds a tiny random Qwen2.5-VL-architecture PaDT model with the shapes tokenizer (OUTPUT_DIR/init);
3. stage0: pretrains its vision tower to classify each merged cell by the colour and kind of its shape
   (OUTPUT_DIR/init_vision; VISION_STEPS=0 skips it);
4. train: trains it on REC/RES + OVD + RIC jointly with {train_config} and the cell-category loss on
   colour x kind classes (OUTPUT_DIR/run; a rerun resumes);
5. eval: evaluates the final model on the held-out scenes with eval/evaluate.py (OUTPUT_DIR/eval; skip with EVAL=0).
About 24 minutes on 2 CPU cores (data 0.7, stage 0 5.5, PaDT training 17, evaluation 1; slower CPUs take up to twice
that; docs/results.md has the figures). The shipped model (padt/assets/tiny_default) was trained longer, in several
continued runs (docs/results.md).

Arguments:
  OUTPUT_DIR            folder for data, init, init_vision, run and eval (created); a rerun reuses what is there
  extra flags           passed to 'python -m padt.train', e.g. --max_steps 200 --num_vrt all --robust_ce false

Environment (each overrides the key of its name in lower case in configs/shapes/recipe.yaml; default in brackets):
  NUM_IMAGES ({num_images})    training scenes           NUM_VAL ({num_val})      held-out scenes
  SEED ({seed})              data seed                 EVAL ({eval})           evaluate after training
  VISION_STEPS ({vision_steps})   stage-0 steps before PaDT training (0 = none)
  VISION_CLASSES        what stage 0 classifies each cell by: colour_kind (colour x kind) or kind ({vision_classes})
  CELL_CLASS_COEF ({cell_class_coef})   weight of the cell-category loss (padt/shapes/cell_class_loss.py; 0 = off)
  CELL_CLASSES          its classes ({cell_classes}): colour_kind (the colour and kind that each REC sentence and each
                        RIC caption mention names) or kind (OVD objects' kinds)
  DATA_DIR              data folder to use or create (default OUTPUT_DIR/data; the ablations share one)
  EXTRA_DATA_DIRS       more generated training sets to mix in, space-separated (made beforehand with
                        src/preprocess/make_shapes.py and another --seed; same image size; evaluation stays on
                        DATA_DIR)
  INIT_FLAGS            extra flags for 'python -m padt.testing.models', e.g. --no-prototype-projection
  EVAL_LIMIT ({eval_limit})        evaluate only the first N held-out samples per task (0 = all)
  EVAL_FLAGS            flags for the four 'eval/evaluate.py' calls ({eval_flags}; EVAL_FLAGS= for none)
  REFER_REPEAT ({refer_repeat})      copies of each set's REC/RES training file in the mix (0 = leave the task out);
  OVD_REPEAT ({ovd_repeat})        likewise OVD_REPEAT and RIC_REPEAT: a set has ~2.5 REC/RES records per scene and
  RIC_REPEAT ({ric_repeat})        one OVD and one RIC record, so OVD_REPEAT=2 RIC_REPEAT=2 balances the three tasks
  NPROC ({nproc})             training processes (data-parallel, gloo; 1 = one process); each gets
                        OMP_NUM_THREADS / NPROC threads: on 2 cores two 1-thread processes train 1.24x faster than
                        one 2-thread process
  BATCH ({batch})            samples per optimizer step, split over the NPROC processes (the training config's
                        per_device_train_batch_size unless set)
  PYTHON (python)       interpreter with padt installed
  OMP_NUM_THREADS ({omp_num_threads})   torch threads (data generation uses every core)
  DRY_RUN (0)           1: print the steps' commands without running them (needs the data for the image size)
"""

ABLATIONS_USAGE = """\
Usage: bash run_scripts/padt_tiny_shapes_ablations.sh OUTPUT_DIR [extra padt.train flags for every variant]

Trains and evaluates tiny shapes models from scratch with run_scripts/padt_tiny_shapes_sft.sh on one shared data set
(OUTPUT_DIR/data), each in OUTPUT_DIR/<variant>, then prints their metrics side by side. The variants and their
settings are in configs/shapes/ablations.yaml:
{variants}
A variant whose run is complete is not trained again (delete its folder to redo it).

Environment (each overrides the key of its name in lower case in configs/shapes/ablations.yaml):
  MAX_STEPS ({max_steps})      optimizer steps per variant
  VARIANTS              subset to run, e.g. "full all_vrt" (default: all)
  LEARNING_RATE ({learning_rate}) peak learning rate of every variant
  DECODER_LR_SCALE ({decoder_lr_scale})  the decoder's rate = LEARNING_RATE x this
  EVAL (1)              0: train only (no evaluation, no table)
  and those of padt_tiny_shapes_sft.sh (EVAL_LIMIT, NUM_VAL, SEED, PYTHON, OMP_NUM_THREADS, ...). The ablations keep
  the recipe the README's table was measured with, the shapes script's earlier defaults (set these to change it):
    {recipe}
"""


def usage(which: str = "sft") -> str:
    if which == "ablations":
        config = read_yaml(ABLATIONS)
        variants = "\n".join(f"  {name:15} {'; '.join(f'{k}: {v}' for k, v in (spec or {}).items()) or 'the recipe'}"
                             for name, spec in config["variants"].items())
        recipe = ", ".join(f"{k.upper()}={v}" for k, v in config["recipe"].items())
        return ABLATIONS_USAGE.format(**{**config, "variants": variants, "recipe": recipe})
    config = read_yaml(RECIPE)
    batch = config["batch"] or read_yaml(ROOT / config["train_config"])["per_device_train_batch_size"]
    return SFT_USAGE.format(**{**config, "batch": batch})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("usage", "-h", "--help"):
        print(usage(argv[1] if len(argv) > 1 else "sft"), end="")
        return
    if len(argv) < 2 or argv[0] not in (*STEPS, "ablations"):
        sys.exit(f"usage: python src/shapes_recipe.py {{{','.join(STEPS)},ablations}} OUTPUT_DIR [padt.train flags]")
    step, out, flags = argv[0], argv[1], argv[2:]
    try:
        if step == "ablations":
            ablations(out, flags)
        else:
            settings = load_settings()
            os.environ["OMP_NUM_THREADS"] = str(settings["omp_num_threads"])  # for every step's commands
            STEPS[step](settings, out, flags)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
