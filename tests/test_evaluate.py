"""eval/evaluate.py and padt.evaluation: metrics end to end, resume after an interruption, sharding, protocols."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from padt.evaluation import distributed
from padt.evaluation.data import load_samples
from padt.evaluation.pipeline import EvalOptions, MissingPredictionsError, evaluate_split, write_summary
from padt.evaluation.records import PredictionStore, read_predictions
from padt.evaluation.runner import run_inference, shard
from padt.evaluation.table import format_table
from padt.geometry.masks import rle_decode, rle_encode
from padt.inference.predictor import PredictedObject, Prediction
from padt.preprocess.templates import RIC_PROMPT, make_record, ovd_answer, ovd_prompt, rec_answer, rec_prompt

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "padt" / "assets" / "tiny_default"
W, H = 130, 90
CAPTIONS = ["A man (<|Obj_0|>) rides a red motorcycle.", "Two dogs (<|Obj_0|>) play in the park.",
            "A plate (<|Obj_0|>) of rice sits on a table.", "A cat (<|Obj_0|>) sleeps on a sofa.",
            "A kite (<|Obj_0|>) flies over the beach.", "A bus (<|Obj_0|>) stops at a station."]


# --------------------------------------------------------------------------- fixtures
def _obj(k: int, label: str) -> dict:
    x1, y1, x2, y2 = 10 + 5 * k, 5 + 3 * k, 70 + 5 * k, 50 + 3 * k
    mask = np.zeros((H, W), np.uint8)
    mask[y1:y2, x1:x2] = 1
    return {"patches": [0], "bbox": [x1 / W, y1 / H, x2 / W, y2 / H], "iscrowd": 0, "area": float(mask.sum()),
            "rle": rle_encode(mask), "label": label}


def make_dataset(root: Path, n: int = 6) -> dict[str, Path]:
    """REC, OVD and RIC JSONL files over n random 130x90 images (RIC: two captions for image 0)."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rec, ovd, ric = [], [], []
    for k in range(n):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(images / f"{k}.png")
        sentence = f"the thing number {k}"
        rec.append(make_record(100 + k, f"{k}.png", rec_prompt(sentence), rec_answer(sentence),
                               [_obj(k, sentence)], "refering"))
        cat = ["cat", "dog"][k % 2]
        ovd.append(make_record(100 + k, f"{k}.png", ovd_prompt(["cat", "dog", "bird"]), ovd_answer([(cat, 1)]),
                               [_obj(k, cat)], "ovd"))
        ric.append(make_record(100 + k, f"{k}.png", RIC_PROMPT, CAPTIONS[k % len(CAPTIONS)], [_obj(k, "")], "ric"))
    ric.insert(1, make_record(100, "0.png", RIC_PROMPT, "A person (<|Obj_0|>) on a motorbike.", [_obj(0, "")], "ric"))
    files = {}
    for name, records in [("refcoco_val", rec), ("coco_val", ovd), ("ric_val", ric)]:
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"images": images, **files}


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "data")


def _vrt_text(text: str) -> str:
    return text.replace("<|Obj_0|>", "<|VRT_0|>") + "<|im_end|>"


class FakePredictor:
    """Same interface as PaDTPredictor.predict; answers from a table (image name, prompt) -> Prediction.

    `fail_after`: raise KeyboardInterrupt (a kill) on the call that would go past that many samples."""

    def __init__(self, answers: dict, fail_after: int | None = None):
        self.answers, self.fail_after, self.seen = answers, fail_after, []

    def predict(self, images, prompts):
        if self.fail_after is not None and len(self.seen) + len(images) > self.fail_after:
            raise KeyboardInterrupt
        out = []
        for image, prompt in zip(images, prompts):
            self.seen.append(Path(image).name)
            out.append(self.answers[(Path(image).name, prompt)])
        return out


def _pred_obj(obj: dict, label: str, shift_px: float = 0.0, score: float = 0.9) -> PredictedObject:
    x1, y1, x2, y2 = obj["bbox"]
    x1, x2 = x1 + shift_px / W, x2 + shift_px / W
    mask = rle_decode(obj["rle"]).astype(bool)
    if shift_px:
        mask = np.roll(mask, int(shift_px), axis=1)
    return PredictedObject(label=label, vrt_ids=[0], box_xyxy=[x1 * W, y1 * H, x2 * W, y2 * H],
                           box_cxcywh=[(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], score=score, mask=mask)


def perfect_answers(files: dict, shift_px: float = 0.0) -> dict:
    """Predictions equal to the ground truth (optionally every box and mask moved right by shift_px)."""
    answers = {}
    for name in ("refcoco_val", "coco_val", "ric_val"):
        for line in files[name].read_text().splitlines():
            rec = json.loads(line)
            key = (rec["image"], rec["conversations"][0]["value"])
            if key in answers:
                continue
            objs = [_pred_obj(o, o["label"], shift_px) for o in rec["objects"]]
            answers[key] = Prediction(text=_vrt_text(rec["answer_template"]), objects=objs, image_size=(W, H),
                                      grid_thw=(1, 6, 10))
    return answers


def _eval(files, task, out, predictor, protocol="standard", **kw):
    data = files["coco_val" if task == "ovd" else "ric_val" if task == "ric" else "refcoco_val"]
    opts = EvalOptions(task=task, protocol=protocol, progress=False, batch_size=kw.pop("batch_size", 2),
                       caption_metrics=kw.pop("caption_metrics", ["BLEU", "ROUGE_L", "CIDEr"]),
                       tokenizer="python", **kw)
    factory = (lambda: predictor) if predictor is not None else None
    return evaluate_split(factory, data, files["images"], out, opts, model_id="fake")


# --------------------------------------------------------------------------- metrics end to end
def test_perfect_predictions_score_one(data, tmp_path):
    fake = FakePredictor(perfect_answers(data))
    out = tmp_path / "out"
    rec = _eval(data, "rec", out, fake, protocol="paper")
    assert rec["metrics"] == pytest.approx({"Acc@0.5": 1.0, "mean_IoU": 1.0, "paper_Acc@0.5": 1.0})
    res = _eval(data, "res", out, fake, protocol="paper")
    assert res["metrics"] == pytest.approx({"cIoU": 1.0, "gIoU": 1.0, "paper_cIoU": 1.0})
    ovd = _eval(data, "ovd", out, fake)
    assert ovd["metrics"]["bbox_AP"] == pytest.approx(1.0) and ovd["metrics"]["segm_AP"] == pytest.approx(1.0)
    assert ovd["info"]["ground_truth"].startswith("preprocessed")
    ric = _eval(data, "ric", out, fake)
    assert ric["info"]["n_samples"] == 6 and ric["info"]["n_captions"] == 7  # image 0 has two captions
    assert ric["metrics"]["grounding_precision@0.5"] == 1.0 and ric["metrics"]["grounding_recall@0.5"] == 1.0
    assert ric["metrics"]["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert len(fake.seen) == 6 + 6 + 6  # REC predictions were reused by RES; RIC asked once per image
    summary = write_summary(out)
    assert set(summary) == {"refcoco_val", "coco_val", "ric_val"} and set(summary["refcoco_val"]) == {"rec", "res"}
    assert json.loads((out / "metrics.json").read_text()) == summary
    table = format_table(summary)
    assert "== REC ==" in table and "refcoco_val" in table and "100.0" in table and "== RIC ==" in table


def test_shifted_boxes_give_their_known_iou(data, tmp_path):
    # every GT box is 60 x 45 px; moved right by s px: I = (60 - s) * 45, U = 2 * 60 * 45 - I
    fake = FakePredictor(perfect_answers(data, shift_px=15))
    rec = _eval(data, "rec", tmp_path / "out", fake)
    assert rec["metrics"]["mean_IoU"] == pytest.approx(0.6) and rec["metrics"]["Acc@0.5"] == 1.0
    fake = FakePredictor(perfect_answers(data, shift_px=21.0))
    rec = _eval(data, "rec", tmp_path / "out21", fake)
    assert rec["metrics"]["mean_IoU"] == pytest.approx(39 / 81) and rec["metrics"]["Acc@0.5"] == 0.0
    res = _eval(data, "res", tmp_path / "out21", None)  # metrics only: reuses the REC predictions
    assert res["metrics"]["gIoU"] == pytest.approx(39 / 81) and res["metrics"]["cIoU"] == pytest.approx(39 / 81)


def test_paper_protocol_echo_keys_and_best_of_n(data, tmp_path):
    answers = perfect_answers(data)
    samples = load_samples(data["refcoco_val"], data["images"], "rec")
    s0, s1 = samples[0], samples[1]
    obj0, obj1 = s0.record["objects"][0], s1.record["objects"][0]
    # sample 0: a paraphrased echo -> the standard protocol hits, the paper's key misses
    answers[(s0.record["image"], s0.prompt)] = Prediction(
        "x", [_pred_obj(obj0, "some other words")], (W, H))
    # sample 1: a wrong first object and a right second one -> standard (top-1) misses, paper (best of N) hits
    answers[(s1.record["image"], s1.prompt)] = Prediction(
        "x", [_pred_obj(obj1, obj1["label"], shift_px=40), _pred_obj(obj1, obj1["label"])], (W, H))
    rec = _eval(data, "rec", tmp_path / "out", FakePredictor(answers), protocol="paper")
    assert rec["metrics"]["Acc@0.5"] == pytest.approx(5 / 6)
    assert rec["metrics"]["paper_Acc@0.5"] == pytest.approx(5 / 6)
    assert rec["info"]["paper_objects_without_key"] == 1
    res = _eval(data, "res", tmp_path / "out", None, protocol="paper")
    assert res["metrics"]["paper_cIoU"] == pytest.approx(5 / 6)  # the paraphrased key scores 0
    assert res["metrics"]["gIoU"] < 1.0 and res["metrics"]["cIoU"] != res["metrics"]["gIoU"]
    std = _eval(data, "rec", tmp_path / "out", None)
    assert "paper_Acc@0.5" not in std["metrics"] and std["protocol"] == "standard"


def test_ovd_against_official_annotations_and_unknown_labels(data, tmp_path):
    answers = perfect_answers(data)
    samples = load_samples(data["coco_val"], data["images"], "ovd")
    official = {"images": [{"id": s.image_id, "width": W, "height": H} for s in samples],
                "annotations": [], "categories": [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"},
                                                  {"id": 16, "name": "bird"}]}
    for s in samples:
        o = s.record["objects"][0]
        x1, y1, x2, y2 = o["bbox"]
        official["annotations"].append({
            "id": len(official["annotations"]) + 1, "image_id": s.image_id, "iscrowd": 0, "area": o["area"],
            "category_id": {"cat": 17, "dog": 18}[o["label"]], "segmentation": o["rle"],
            "bbox": [x1 * W, y1 * H, (x2 - x1) * W, (y2 - y1) * H]})
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(official))
    extra = samples[0]
    pred = answers[(extra.record["image"], extra.prompt)]
    answers[(extra.record["image"], extra.prompt)] = Prediction(
        pred.text, pred.objects + [_pred_obj(extra.record["objects"][0], "unicorn")], (W, H))
    ovd = _eval(data, "ovd", tmp_path / "out", FakePredictor(answers), annotations=str(ann_file))
    assert ovd["metrics"]["bbox_AP"] == pytest.approx(1.0) and ovd["metrics"]["segm_AP"] == pytest.approx(1.0)
    assert ovd["info"]["unknown_labels"] == {"unicorn": 1} and ovd["info"]["ground_truth"].startswith("official")
    assert any("unicorn" in n or "no category" in n for n in ovd["info"]["notes"])


# --------------------------------------------------------------------------- resume
def test_interrupted_run_resumes_without_regenerating(data, tmp_path):
    answers = perfect_answers(data, shift_px=7)
    full = tmp_path / "full"
    _eval(data, "rec", full, FakePredictor(answers), protocol="paper")

    out = tmp_path / "resumed"
    first = FakePredictor(answers, fail_after=3)  # batches of 2: the 2nd batch goes past 3 -> killed after 2 samples
    with pytest.raises(KeyboardInterrupt):
        _eval(data, "rec", out, first, protocol="paper")
    pred_file = out / "refcoco_val" / "predictions.rank0.jsonl"
    assert len(pred_file.read_text().splitlines()) == 2 and not (out / "refcoco_val" / "metrics.json").exists()
    with open(pred_file, "a") as f:  # and a torn last line, as from a kill during a write
        f.write('{"index": 2, "id": 10')
    second = FakePredictor(answers)
    _eval(data, "rec", out, second, protocol="paper")
    assert second.seen == [f"{k}.png" for k in range(2, 6)]  # the first 2 were not regenerated
    assert sorted(read_predictions(out / "refcoco_val")) == list(range(6))
    assert (out / "refcoco_val" / "metrics.json").read_bytes() == (full / "refcoco_val" / "metrics.json").read_bytes()
    third = FakePredictor(answers)
    _eval(data, "rec", out, third, protocol="paper")
    assert third.seen == []


def test_resume_with_the_real_tiny_model(data, tmp_path):
    from padt.inference.predictor import PaDTPredictor

    def load(fail_after=None):
        real = PaDTPredictor.from_pretrained(TINY, device="cpu", max_new_tokens=48)

        class Interrupting:
            calls = 0

            def predict(self, images, prompts):
                if fail_after is not None and Interrupting.calls >= fail_after:
                    raise KeyboardInterrupt
                Interrupting.calls += 1
                return real.predict(images, prompts)

        return Interrupting()

    opts = EvalOptions(task="res", batch_size=1, max_new_tokens=48, progress=False, limit=4)
    full = tmp_path / "full"
    evaluate_split(load, data["refcoco_val"], data["images"], full, opts, model_id=str(TINY))
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        evaluate_split(lambda: load(fail_after=2), data["refcoco_val"], data["images"], out, opts, model_id=str(TINY))
    pred_file = out / "refcoco_val" / "predictions.rank0.jsonl"
    first_two = pred_file.read_text().splitlines()
    assert len(first_two) == 2
    entry = evaluate_split(load, data["refcoco_val"], data["images"], out, opts, model_id=str(TINY))
    assert pred_file.read_text().splitlines()[:2] == first_two
    assert (out / "refcoco_val" / "metrics.json").read_bytes() == (full / "refcoco_val" / "metrics.json").read_bytes()
    assert 0.0 <= entry["metrics"]["cIoU"] <= 1.0 and entry["info"]["n_samples"] == 4
    records = read_predictions(out / "refcoco_val")
    assert all(r["image_size"] == [W, H] and r["objects"][0]["mask_rle"]["size"] == [H, W] for r in records.values())
    # another model into the same directory is refused
    with pytest.raises(ValueError, match="different run"):
        evaluate_split(load, data["refcoco_val"], data["images"], out, opts, model_id="another/model")


# --------------------------------------------------------------------------- sharding
def test_sharded_ranks_cover_every_sample_once(data, tmp_path):
    answers = perfect_answers(data, shift_px=9)
    samples = load_samples(data["refcoco_val"], data["images"], "rec")
    assert [s.index for s in shard(samples, 1, 4)] == [1, 5]
    out = tmp_path / "out"
    fakes = [FakePredictor(answers) for _ in range(3)]
    for rank in range(3):  # three "processes", one after the other
        store = PredictionStore(out / "refcoco_val", rank)
        stats = run_inference(fakes[rank], samples, store, batch_size=1, rank=rank, world_size=3, progress=False)
        assert stats.generated == 2
    assert [f.seen for f in fakes] == [["0.png", "3.png"], ["1.png", "4.png"], ["2.png", "5.png"]]
    sharded = _eval(data, "rec", out, None)  # metrics only: merges the three rank files
    single = _eval(data, "rec", tmp_path / "single", FakePredictor(answers))
    assert sharded == single
    # a restart with another number of processes skips everything that any rank already did
    again = FakePredictor(answers)
    run_inference(again, samples, PredictionStore(out / "refcoco_val", 0), rank=0, world_size=1, progress=False)
    assert again.seen == []


def test_dist_info_reads_the_launcher_environment(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.dist_info() == distributed.DistInfo(2, 4, 0)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK < WORLD_SIZE"):
        distributed.dist_info()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="integer"):
        distributed.dist_info()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(data, tmp_path):
    common = ["--model", str(TINY), "--task", "rec", "--data", str(data["refcoco_val"]), "--images",
              str(data["images"]), "--max-new-tokens", "4", "--batch-size", "1", "--no-progress", "--limit", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(ROOT / "eval" / "evaluate.py"), *common, "--out", str(tmp_path / "two")],
        check=False, capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert len((tmp_path / "two" / "refcoco_val" / "predictions.rank1.jsonl").read_text().splitlines()) == 2
    one = _cli()(common + ["--out", str(tmp_path / "one")])
    assert one == 0
    a = json.loads((tmp_path / "two" / "refcoco_val" / "metrics.json").read_text())
    b = json.loads((tmp_path / "one" / "refcoco_val" / "metrics.json").read_text())
    assert a == b


# --------------------------------------------------------------------------- CLI
def _cli():
    spec = importlib.util.spec_from_file_location("padt_evaluate_cli", ROOT / "eval" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_end_to_end_with_the_tiny_model(data, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", str(TINY), "--task", "ric", "--data", str(data["ric_val"]), "--images", str(data["images"]),
            "--out", str(out), "--max-new-tokens", "4", "--batch-size", "3", "--no-progress",
            "--caption-metrics", "BLEU", "ROUGE_L", "CIDEr", "--caption-tokenizer", "python"]
    assert _cli()(args) == 0
    printed = capsys.readouterr().out
    assert "== RIC ==" in printed and "ric_val" in printed
    metrics = json.loads((out / "metrics.json").read_text())["ric_val"]["ric"]
    assert {"Bleu_4", "ROUGE_L", "CIDEr", "grounding_precision@0.5"} <= set(metrics["metrics"])
    assert metrics["info"]["caption_tokenizer"] == "python" and metrics["info"]["n_samples"] == 6
    assert len((out / "ric_val" / "predictions.rank0.jsonl").read_text().splitlines()) == 6


def test_cli_errors_are_clear(data, tmp_path, capsys):
    main = _cli()
    base = ["--images", str(data["images"]), "--out", str(tmp_path / "out")]
    assert main(["--task", "rec", "--data", str(data["refcoco_val"]), *base]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert main(["--task", "rec", "--data", str(tmp_path / "nope.jsonl"), "--metrics-only", *base]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["--task", "rec", "--data", str(data["refcoco_val"]), "--metrics-only", *base]) == 1
    assert "have no prediction" in capsys.readouterr().err
    assert main(["--task", "ovd", "--data", str(data["refcoco_val"]), "--metrics-only", *base]) == 1
    assert "'refering' record" in capsys.readouterr().err
    with pytest.raises(MissingPredictionsError):
        _eval(data, "rec", tmp_path / "empty", None)


def test_eval_all_script_builds_every_command(data, tmp_path):
    root = tmp_path / "layout"
    (root / "RefCOCO").mkdir(parents=True)
    for split in ("refcoco_val", "refcocog_test"):
        (root / "RefCOCO" / f"{split}.json").write_text(data["refcoco_val"].read_text())
    (root / "ReferringImageCaptioning").mkdir()
    (root / "ReferringImageCaptioning" / "ric_instances_val2017.json").write_text(data["ric_val"].read_text())
    env = {**os.environ, "DATA_ROOT": str(root), "COCO_ROOT": str(tmp_path / "coco"), "DRY_RUN": "1",
           "PYTHON": sys.executable, "NPROC_PER_NODE": "2"}
    done = subprocess.run(["bash", str(ROOT / "run_scripts" / "eval_all.sh"), "CKPT", str(tmp_path / "out"), "--",
                           "--limit", "3"], check=False, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    commands = [line[2:] for line in done.stderr.splitlines() if line.startswith("+ ")]
    assert [c.split("--task ")[1].split()[0] for c in commands] == ["rec", "res", "ric"]
    assert all("torch.distributed.run --nproc_per_node 2" in c and c.endswith("--limit 3") for c in commands)
    assert "refcoco_val.json" in commands[0] and "refcocog_test.json" in commands[0]
    assert "skipping missing" in done.stderr and "refcoco+_val.json" in done.stderr
    assert "instances_val2017.json" in done.stderr  # the missing COCO file is reported, not silently dropped


def test_table_cli_puts_several_runs_side_by_side(tmp_path, capsys):
    from padt.evaluation.table import main as table_main

    for name, acc in (("full", 0.9), ("no_proj", 0.5)):
        (tmp_path / name).mkdir()
        entry = {"protocol": "standard", "metrics": {"Acc@0.5": acc, "mean_IoU": acc - 0.1}, "info": {"n_samples": 4}}
        (tmp_path / name / "metrics.json").write_text(json.dumps({"refer_val": {"rec": entry}}))
    assert table_main([f"full={tmp_path / 'full'}", f"no_proj={tmp_path / 'no_proj'}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if ":" in line}
    assert rows["full:refer_val"][-1] == "90.0" and rows["no_proj:refer_val"][-1] == "50.0"
    assert table_main([str(tmp_path / "missing")]) == 2
