"""The launch layer: run scripts (syntax, usage, the command they build), configs, the entry point's --help, and the
tiny CPU recipe with 2 processes where one rank's batch has no object (under a timeout: no hang)."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RUN_SCRIPTS = ROOT / "run_scripts"
RECIPES = [f"padt_{task}_{size}_sft.sh" for task in ("ovd", "rec", "ric", "pro") for size in ("3b", "7b")]
RECIPE_OPTIONS = ("--model", "--output_dir", "--data_files", "--image_folders", "--coco_root", "--data_config",
                  "--deepspeed", "--report_to", "--attn_implementation", "--dry_run", "NNODES", "NODE_RANK",
                  "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE")


def run(cmd: list[str], env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def make_small_shapes(folder: Path, counts: dict[str, int], seed: int = 0, **options):
    """A tiny generated shapes set (56 x 56 px scenes, one large shape each) for the shapes scripts' tests; `options`
    override `ShapesConfig` fields. Returns the config."""
    from padt.shapes import ShapesConfig, generate_dataset

    config = ShapesConfig(**{"height": 56, "width": 56, "max_objects": 1, "size_range": (0.5, 0.7), **options})
    generate_dataset(folder, counts, seed=seed, config=config)
    return config


def test_every_run_script_parses_with_bash_n():
    scripts = sorted(RUN_SCRIPTS.glob("*.sh"))
    assert {s.name for s in scripts} >= set(RECIPES) | {"padt_tiny_cpu_sft.sh", "_common.sh"}
    for script in scripts:
        proc = run(["bash", "-n", str(script)])
        assert proc.returncode == 0, (script.name, proc.stderr)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_help_names_its_arguments(name):
    proc = run(["bash", str(RUN_SCRIPTS / name), "--help"])
    assert proc.returncode == 0, proc.stderr
    for option in RECIPE_OPTIONS:
        assert option in proc.stdout, f"{name} --help does not mention {option}"


def _dry_run(name: str, *args: str, env: dict | None = None) -> list[str]:
    proc = run(["bash", str(RUN_SCRIPTS / name), "--dry_run", *args], env=env)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def _train_flags(argv: list[str]) -> list[str]:
    return argv[argv.index("padt.train") + 1:]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_builds_the_authors_hyperparameters(name):
    from padt.train.arguments import parse_train_args

    argv = _dry_run(name, "--coco_root", "/data/coco", env={"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.1.2.3",
                                                            "MASTER_PORT": "23456", "NPROC_PER_NODE": "4"})
    launcher = " ".join(argv[: argv.index("padt.train")])
    for flag in ("--nnodes 2", "--node_rank 1", "--master_addr 10.1.2.3", "--master_port 23456", "--nproc_per_node 4"):
        assert flag in launcher
    # parse exactly what padt.train would get (use_cpu only so that bf16 parses on a CPU machine)
    script, args = parse_train_args(_train_flags(argv) + ["--use_cpu", "true"])
    size = name.split("_")[2]
    assert args.num_train_epochs == (4 if size == "3b" else 6)
    assert (args.learning_rate, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2e-5, 16, 1)
    assert args.bf16 and args.activation_checkpointing and (args.seed, args.data_seed) == (42, 42)
    assert (args.save_steps, args.logging_steps) == (100, 1) and args.report_to in ([], ["none"], "none")
    assert args.deepspeed.endswith("configs/deepspeed/zero3.json") and args.attn_implementation == "sdpa"
    assert script.model_name_or_path == f"Qwen/Qwen2.5-VL-{size.upper()}-Instruct"
    files, folders = script.data_file_paths.split(":"), script.image_folders.split(":")
    assert len(files) == len(folders) and all(f.startswith("/data/coco/") for f in folders)
    expected = {"ovd": ["PaDT-MLLM/COCO/instances_train2017.json"],
                "rec": [f"PaDT-MLLM/RefCOCO/{d}_train.json" for d in ("refcoco", "refcoco+", "refcocog")],
                "ric": ["PaDT-MLLM/ReferringImageCaptioning/ric_instances_train2017.json"]}
    expected["pro"] = (expected["ric"] + expected["ovd"] * 2 + expected["rec"])  # COCO twice
    assert files == expected[name.split("_")[1]]


def test_recipe_paths_from_environment_and_passthrough_flags():
    argv = _dry_run("padt_rec_7b_sft.sh", "--", "--use_lora", "true",
                    env={"DATA_CONFIG": "configs/data/rec.yaml", "OUTPUT_DIR": "/out/x", "REPORT_TO": "tensorboard",
                         "MODEL_NAME_OR_PATH": "/models/qwen7b"})
    flags = _train_flags(argv)
    assert flags[flags.index("--data_config") + 1] == "configs/data/rec.yaml" and "--data_file_paths" not in flags
    assert flags[flags.index("--output_dir") + 1] == "/out/x"
    assert flags[flags.index("--report_to") + 1] == "tensorboard"
    assert flags[flags.index("--model_name_or_path") + 1] == "/models/qwen7b"
    assert flags[-2:] == ["--use_lora", "true"]


def test_tiny_script_usage():
    proc = run(["bash", str(RUN_SCRIPTS / "padt_tiny_cpu_sft.sh"), "--help"])
    assert proc.returncode == 0 and "OUTPUT_DIR" in proc.stdout and "NPROC_PER_NODE" in proc.stdout
    proc = run(["bash", str(RUN_SCRIPTS / "padt_tiny_cpu_sft.sh")])
    assert proc.returncode == 2 and "Usage" in proc.stdout


@pytest.mark.parametrize("name, words", [
    ("padt_tiny_shapes_sft.sh", ["OUTPUT_DIR", "NUM_IMAGES", "DATA_DIR", "EXTRA_DATA_DIRS", "INIT_FLAGS", "EVAL_LIMIT",
                                 "VISION_STEPS", "VISION_CLASSES", "CELL_CLASSES", "EVAL_FLAGS", "REFER_REPEAT",
                                 "OVD_REPEAT", "RIC_REPEAT"]),
    ("padt_tiny_shapes_ablations.sh", ["OUTPUT_DIR", "MAX_STEPS", "VARIANTS", "no_projection", "no_robust_ce",
                                       "all_vrt"]),
])
def test_shapes_scripts_usage(name, words):
    proc = run(["bash", str(RUN_SCRIPTS / name), "--help"])
    assert proc.returncode == 0 and all(w in proc.stdout for w in words), proc.stdout
    proc = run(["bash", str(RUN_SCRIPTS / name)])
    assert proc.returncode == 2 and "Usage" in proc.stdout


def test_shapes_ablations_reject_an_unknown_variant(tmp_path):
    env = {**os.environ, "VARIANTS": "no_such_variant", "PYTHON": sys.executable}
    proc = run(["bash", str(RUN_SCRIPTS / "padt_tiny_shapes_ablations.sh"), str(tmp_path)], env=env)
    assert proc.returncode == 2 and "unknown variant 'no_such_variant'" in proc.stderr


def test_shapes_ablations_keep_the_recipe_they_were_measured_with(tmp_path):
    """The ablation table in docs/results.md was measured with the shapes script's earlier defaults: 2e-3, no stage 0, no
    cell-category loss. The ablation script pins them whatever the shapes script's defaults are now."""
    make_small_shapes(tmp_path / "data", {"train": 8, "val": 2})
    env = {**os.environ, "VARIANTS": "full", "MAX_STEPS": "1", "EVAL": "0", "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "2"}
    for name in ("LEARNING_RATE", "DECODER_LR_SCALE", "NPROC", "VISION_STEPS", "CELL_CLASS_COEF", "NUM_IMAGES"):
        env.pop(name, None)
    proc = run(["bash", str(RUN_SCRIPTS / "padt_tiny_shapes_ablations.sh"), str(tmp_path),
                "--per_device_train_batch_size", "2"], env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = torch.load(tmp_path / "full" / "run" / "training_args.bin", weights_only=False)
    assert args.learning_rate == 2e-3 and args.max_steps == 1 and args.cell_class_loss_coef == 0.0
    assert args.decoder_lr_scale == 1.0 and args.ddp_backend is None  # one process (NPROC=1), the decoder at 1x
    assert not (tmp_path / "full" / "init_vision").exists() and not (tmp_path / "full" / "eval").exists()


def test_shapes_script_refuses_extra_sets_it_cannot_mix(tmp_path):
    """EXTRA_DATA_DIRS: a folder without a generated set, or scenes of another size, stop the script before it builds
    or trains anything."""
    make_small_shapes(tmp_path / "main", {"train": 1})
    make_small_shapes(tmp_path / "big", {"train": 1}, seed=1, height=84, width=84)
    script = str(RUN_SCRIPTS / "padt_tiny_shapes_sft.sh")
    for extra, message in ((tmp_path / "nothing", "has no manifest.json"), (tmp_path / "big", "one image size")):
        env = {"DATA_DIR": str(tmp_path / "main"), "EXTRA_DATA_DIRS": str(extra), "PYTHON": sys.executable}
        proc = run(["bash", script, str(tmp_path / "out")], env=env)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out" / "init").exists()


def test_shapes_script_pretrains_the_vision_tower_first(tmp_path):
    """The recipe's defaults: stage 0 on colour x kind classes writes OUTPUT_DIR/init_vision, and PaDT training starts
    from it (not from the random init), the tower at the full rate, with the cell-category loss on colour x kind."""
    from safetensors.torch import load_file

    make_small_shapes(tmp_path / "data", {"train": 8, "val": 2})
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "PYTHON": sys.executable, "VISION_STEPS": "6",
           "EVAL": "0", "OMP_NUM_THREADS": "2"}
    for name in ("VISION_CLASSES", "CELL_CLASS_COEF", "CELL_CLASSES"):
        env.pop(name, None)
    proc = run(["bash", str(RUN_SCRIPTS / "padt_tiny_shapes_sft.sh"), str(tmp_path / "out"), "--max_steps", "1",
                "--per_device_train_batch_size", "2", "--save_steps", "100"], env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "init_vision" / "vision_pretrain.json").read_text())
    assert report["steps"] == 6 and report["training_images"] == 8
    assert report["cell_classes"] == "colour_kind" and report["num_classes"] == 5 * 3  # the default colours x kinds
    init, vision, run_ = (load_file(str(tmp_path / "out" / d / "model.safetensors"))
                          for d in ("init", "init_vision", "run"))
    key = next(k for k in init if k.endswith("patch_embed.proj.weight"))
    # one step at the first warm-up rate moves the weights far less than the vision pretraining did
    assert (run_[key] - vision[key]).norm() < 0.1 * (vision[key] - init[key]).norm()
    args = torch.load(tmp_path / "out" / "run" / "training_args.bin", weights_only=False)
    assert args.vision_lr_scale == 1.0 and args.cell_class_loss_coef == 1.0 and args.cell_class_match == "phrase"
    assert len(args.cell_class_names) == 15 and "red square" in args.cell_class_names


@pytest.mark.parametrize("classes", ["kind", "colour_kind"])
def test_shapes_script_cell_class_loss_uses_the_classes_of_the_data(tmp_path, classes):
    """CELL_CLASS_COEF > 0 adds the cell-category loss with the set's classes (manifest.json): its kinds, matched
    exactly against object labels, or every "colour kind", matched as a phrase in the REC sentences."""
    config = make_small_shapes(tmp_path / "data", {"train": 4, "val": 1}, kinds=("square", "triangle"))
    names, match = ["square", "triangle"], "exact"
    if classes == "colour_kind":
        names, match = [f"{c} {k}" for c in config.colours for k in config.kinds], "phrase"
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "PYTHON": sys.executable, "CELL_CLASS_COEF": "0.5",
           "CELL_CLASSES": classes, "EVAL": "0", "OMP_NUM_THREADS": "2", "VISION_STEPS": "0"}
    # one batch holds all 12 records (4 scenes x REC/OVD/RIC), so every step has OVD objects with kind labels
    proc = run(["bash", str(RUN_SCRIPTS / "padt_tiny_shapes_sft.sh"), str(tmp_path / "out"), "--max_steps", "2",
                "--per_device_train_batch_size", "12", "--logging_steps", "1", "--save_steps", "100"],
               env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = torch.load(tmp_path / "out" / "run" / "training_args.bin", weights_only=False)
    assert args.cell_class_names == names and args.cell_class_match == match and args.cell_class_loss_coef == 0.5
    state = json.loads((tmp_path / "out" / "run" / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss_cell_class" in e]
    assert len(logged) == 2 and all(e["loss_cell_class"] > 0 for e in logged)


def test_shapes_script_evaluates_the_four_tasks_with_eval_flags(tmp_path):
    """The evaluation block: EVAL_LIMIT samples per task, EVAL_FLAGS reach every eval/evaluate.py call."""
    make_small_shapes(tmp_path / "data", {"train": 2, "val": 3})
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "PYTHON": sys.executable, "EVAL_LIMIT": "2",
           "EVAL_FLAGS": "--distinct-vrts --max-new-tokens 24", "OMP_NUM_THREADS": "2", "VISION_STEPS": "0"}
    proc = run(["bash", str(RUN_SCRIPTS / "padt_tiny_shapes_sft.sh"), str(tmp_path / "out"), "--max_steps", "1",
                "--per_device_train_batch_size", "2", "--save_steps", "100"], env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for split in ("refer_val", "ovd_val", "ric_val"):
        folder = tmp_path / "out" / "eval" / split
        meta = json.loads((folder / "run.json").read_text())
        assert meta["distinct_vrts"] is True and meta["max_new_tokens"] == 24, meta
        assert len((folder / "predictions.rank0.jsonl").read_text().splitlines()) == 2
    metrics = json.loads((tmp_path / "out" / "eval" / "metrics.json").read_text())
    assert {split: sorted(m) for split, m in metrics.items()} == {
        "refer_val": ["rec", "res"], "ovd_val": ["ovd"], "ric_val": ["ric"]}


def test_shapes_script_mixes_tasks_by_repeat_counts(tmp_path):
    """REFER_REPEAT / OVD_REPEAT / RIC_REPEAT: how many copies of each set's task file the training mix holds."""
    for name, seed in (("data", 0), ("extra", 1)):
        make_small_shapes(tmp_path / name, {"train": 2}, seed=seed)
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "EXTRA_DATA_DIRS": str(tmp_path / "extra"),
           "PYTHON": sys.executable, "EVAL": "0", "OMP_NUM_THREADS": "2", "OVD_REPEAT": "2", "RIC_REPEAT": "0",
           "VISION_STEPS": "0"}
    proc = run(["bash", str(RUN_SCRIPTS / "padt_tiny_shapes_sft.sh"), str(tmp_path / "out"), "--max_steps", "1",
                "--per_device_train_batch_size", "2", "--save_steps", "100"], env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # padt.train logs the dataset it built: "PaDTDataset(12 items: DIR/refer_train.jsonl x1 (2), ...; geometry)"
    logged = re.search(r"PaDTDataset\((\d+) items: (.*?); GridGeometry", proc.stderr)
    assert logged, proc.stderr[-3000:]
    sources = [Path(part.split(" x1 ")[0]) for part in logged.group(2).split(", ")]
    assert [(f.parent.name, f.name) for f in sources] == [
        (d, name) for d in ("data", "extra") for name in ("refer_train.jsonl", "ovd_train.jsonl", "ovd_train.jsonl")]
    assert int(logged.group(1)) == 2 * 3 * 2  # two sets x three files x two one-object scenes


@pytest.mark.parametrize("env, message", [
    ({"OVD_REPEAT": "two"}, "OVD_REPEAT must be a whole number of copies"),
    ({"RIC_REPEAT": "-1"}, "RIC_REPEAT must be a whole number of copies"),
    ({"REFER_REPEAT": "08"}, "REFER_REPEAT must be a whole number of copies"),
    ({"REFER_REPEAT": "0", "OVD_REPEAT": "0", "RIC_REPEAT": "0"}, "all 0: no training data left"),
])
def test_shapes_script_rejects_bad_repeat_counts(tmp_path, env, message):
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "PYTHON": sys.executable, "NUM_IMAGES": "2",
           "NUM_VAL": "1", **env}
    proc = run(["bash", str(RUN_SCRIPTS / "padt_tiny_shapes_sft.sh"), str(tmp_path / "out")], env=env, timeout=600)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()  # before any work


def test_shapes_script_rejects_unknown_cell_classes(tmp_path):
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "PYTHON": sys.executable, "CELL_CLASS_COEF": "1",
           "CELL_CLASSES": "shape", "NUM_IMAGES": "2", "NUM_VAL": "1"}
    proc = run(["bash", str(RUN_SCRIPTS / "padt_tiny_shapes_sft.sh"), str(tmp_path / "out")], env=env, timeout=600)
    assert proc.returncode == 2 and "CELL_CLASSES must be kind or colour_kind" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()  # before any work


def test_shapes_script_dry_run_prints_the_recipe_of_the_config(tmp_path):
    """DRY_RUN=1: every step prints its command with configs/shapes/recipe.yaml's values and nothing runs: the model
    at the scenes' size, 3000 stage-0 steps on colour x kind, two processes of 8 samples and one thread each, the
    cell-category loss on the 15 colour x kind classes, and the four evaluations with --distinct-vrts."""
    make_small_shapes(tmp_path / "data", {"train": 2, "val": 1})
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "PYTHON": sys.executable, "DRY_RUN": "1",
           "OMP_NUM_THREADS": "2"}
    for name in ("NPROC", "BATCH", "VISION_STEPS", "VISION_CLASSES", "CELL_CLASS_COEF", "CELL_CLASSES", "EVAL",
                 "EVAL_FLAGS", "EVAL_LIMIT", "INIT_FLAGS", "EXTRA_DATA_DIRS"):
        env.pop(name, None)
    proc = run(["bash", str(RUN_SCRIPTS / "padt_tiny_shapes_sft.sh"), str(tmp_path / "out")], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    commands = [" ".join(shlex.split(line[2:])) for line in proc.stderr.splitlines() if line.startswith("+ ")]
    init, stage0, train, *evals, table = commands
    assert "-m padt.testing.models" in init and "--min-pixels 3136 --max-pixels 3136" in init
    assert "pretrain_shapes_vision.py" in stage0 and "--steps 3000 --cell-classes colour_kind" in stage0
    assert train.startswith("OMP_NUM_THREADS=1 ") and "--nproc_per_node 2 -m padt.train --ddp_backend gloo" in train
    assert "--per_device_train_batch_size 8" in train and "configs/train/tiny_shapes.yaml" in train
    assert f"--model_name_or_path {tmp_path / 'out' / 'init_vision'}" in train
    names = train.split("--cell_class_names ")[1].split(" --cell_class_match ")[0]
    assert names.count(" square") == 5 and train.endswith("--cell_class_match phrase")
    assert [c.split("--task ")[1].split()[0] for c in evals] == ["rec", "res", "ovd", "ric"]
    assert all(c.endswith("--distinct-vrts") for c in evals) and "padt.evaluation.table" in table
    assert not (tmp_path / "out").exists()


def test_entry_point_help_names_the_padt_arguments():
    proc = run([sys.executable, "-m", "padt.train", "--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    for arg in ("--model_name_or_path", "--data_file_paths", "--image_folders", "--data_config", "--num_vrt",
                "--robust_ce", "--use_mask_loss", "--warmup_prototype_steps", "--use_lora", "--freeze_vision",
                "--decoder_lr_scale", "--vision_lr_scale",
                "--use_visual_prototype_projection", "--attn_implementation", "--min_pixels", "--max_pixels"):
        assert arg in proc.stdout, arg


# ============================================================================ configs
def test_deepspeed_configs():
    z2 = json.loads((ROOT / "configs/deepspeed/zero2.json").read_text())
    z3 = json.loads((ROOT / "configs/deepspeed/zero3.json").read_text())
    assert z2["zero_optimization"]["stage"] == 2 and z3["zero_optimization"]["stage"] == 3
    zo = z3["zero_optimization"]
    assert zo["overlap_comm"] and zo["contiguous_gradients"] and zo["stage3_gather_16bit_weights_on_model_save"]
    assert zo["offload_optimizer"]["device"] == zo["offload_param"]["device"] == "none"
    assert zo["sub_group_size"] == zo["stage3_max_live_parameters"] == zo["stage3_max_reuse_distance"] == 1e9
    for cfg in (z2, z3):
        assert cfg["bf16"]["enabled"] == cfg["gradient_clipping"] == cfg["train_micro_batch_size_per_gpu"] == "auto"


def test_accelerate_configs():
    import yaml

    for stage in (2, 3):
        cfg = yaml.safe_load((ROOT / f"configs/accelerate/deepspeed_zero{stage}.yaml").read_text())
        assert cfg["distributed_type"] == "DEEPSPEED" and cfg["deepspeed_config"]["zero_stage"] == stage
        assert cfg["num_processes"] == 8 and cfg["mixed_precision"] == "bf16"


def test_data_mixtures_load():
    from padt.data import load_sources_yaml

    mixes = {name: load_sources_yaml(ROOT / f"configs/data/{name}.yaml") for name in ("ovd", "rec", "ric", "pro")}
    pro = {s.name: s for s in mixes["pro"]}
    assert pro["coco_train2017"].repeat == 2 and len(pro) == 5
    assert [s.path for s in mixes["ovd"]] == ["PaDT-MLLM/COCO/instances_train2017.json"]
    assert all(s.image_folder for mix in mixes.values() for s in mix)


@pytest.mark.parametrize("name", ["sft_3b", "sft_7b", "tiny_cpu", "tiny_shapes"])
def test_train_configs_parse(name, tmp_path):
    from padt.train.arguments import parse_train_args

    script, args = parse_train_args(["--config", str(ROOT / f"configs/train/{name}.yaml"), "--use_cpu", "true",
                                     "--output_dir", str(tmp_path)])
    if name.startswith("sft"):
        assert args.num_train_epochs == (4 if name == "sft_3b" else 6) and args.learning_rate == 2e-5
        assert script.model_name_or_path.endswith("Instruct")
    else:
        assert args.max_steps > 0 and not args.bf16
    if name == "tiny_shapes":  # the shapes script's recipe: the shapes' pixel count, the authors' loss weights
        assert script.min_pixels == script.max_pixels == 168 * 168
        assert args.max_steps == 4500 and args.learning_rate == 1e-3 and args.vrt_per_object == 5
        assert args.decoder_lr_scale == 2.0 and args.per_device_train_batch_size == 16
        assert set(args.loss_weights().values()) == {1.0}


# ============================================================================ the tiny CPU recipe, 2 processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tiny_cpu_script_two_processes_with_an_empty_rank(tmp_path):
    """`NPROC_PER_NODE=2 bash run_scripts/padt_tiny_cpu_sft.sh DIR`: completes (timeout = no hang), and at some step
    exactly one of the two ranks had a batch without any object."""
    env = {"NPROC_PER_NODE": "2", "PYTHON": sys.executable, "MASTER_PORT": str(_free_port())}
    proc = run(["bash", str(RUN_SCRIPTS / "padt_tiny_cpu_sft.sh"), str(tmp_path)], env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    steps = [e for e in state["log_history"] if "loss_ce" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(e["loss"]) and math.isfinite(e["loss_giou"]) for e in steps)
    assert any(e["batches_without_objects"] == 0.5 for e in steps), [e["batches_without_objects"] for e in steps]
    assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "run" / "checkpoint-4").is_dir()
