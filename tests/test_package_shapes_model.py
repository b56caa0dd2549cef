"""src/package_shapes_model.py: packaging a trained shapes run as the shipped default, from one or several data sets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from padt.shapes import ShapesConfig, generate_dataset

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("package_shapes_model", ROOT / "src" / "package_shapes_model.py")
package = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(package)

SCENES = ShapesConfig(height=56, width=56, colours=("red", "blue"), backgrounds=("gray",), max_objects=1)


def fake_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    for name in package.MODEL_FILES:
        (run / name).write_text(name)
    return run


def test_two_training_sets_are_recorded_with_their_seeds(tmp_path):
    generate_dataset(tmp_path / "a", {"train": 2, "val": 1}, seed=0, config=SCENES)
    generate_dataset(tmp_path / "b", {"train": 3}, seed=1, config=SCENES)
    out = tmp_path / "out"
    package.main(["--run", str(fake_run(tmp_path)), "--data", str(tmp_path / "a"), str(tmp_path / "b"),
                  "--out", str(out)])
    card = json.loads((out / "training_data.json").read_text())
    assert card["seed"] == 0 and "files" not in card
    assert [(t["seed"], t["splits"]["train"]["images"]) for t in card["training_sets"]] == [(0, 2), (1, 3)]
    assert (out / "sample.png").read_bytes() == (tmp_path / "a" / "images" / "val_000000.png").read_bytes()
    assert all((out / name).read_text() == name for name in package.MODEL_FILES)


def test_one_set_has_no_training_sets_and_other_options_are_refused(tmp_path):
    generate_dataset(tmp_path / "a", {"train": 1, "val": 1}, seed=0, config=SCENES)
    report = tmp_path / "vision_pretrain.json"
    report.write_text('{"steps": 7}')
    package.main(["--run", str(fake_run(tmp_path)), "--data", str(tmp_path / "a"), "--out", str(tmp_path / "o1"),
                  "--vision-pretrain", str(report)])
    assert "training_sets" not in json.loads((tmp_path / "o1" / "training_data.json").read_text())
    assert json.loads((tmp_path / "o1" / "vision_pretrain.json").read_text()) == {"steps": 7}
    generate_dataset(tmp_path / "c", {"train": 1}, seed=1, config=ShapesConfig(height=84, width=84, max_objects=1))
    with pytest.raises(SystemExit, match="other options"):
        package.main(["--run", str(tmp_path / "run"), "--data", str(tmp_path / "a"), str(tmp_path / "c"),
                      "--out", str(tmp_path / "o2")])


def test_a_continued_run_keeps_the_earlier_log_in_front_with_shifted_steps(tmp_path):
    generate_dataset(tmp_path / "a", {"train": 1, "val": 1}, seed=0, config=SCENES)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "training_log.json").write_text(json.dumps([{"step": 25, "loss_ce": 3.0}, {"step": 50, "loss_ce": 2.0}]))
    run = fake_run(tmp_path)
    (run / "trainer_state.json").write_text(json.dumps({"log_history": [
        {"step": 25, "loss_ce": 1.0}, {"step": 25, "train_runtime": 9.0}, {"step": 50, "loss_ce": 0.5}]}))
    package.main(["--run", str(run), "--data", str(tmp_path / "a"), "--out", str(tmp_path / "o"),
                  "--continued-from", str(earlier)])
    log = json.loads((tmp_path / "o" / "training_log.json").read_text())
    assert [(e["step"], e["loss_ce"]) for e in log] == [(25, 3.0), (50, 2.0), (75, 1.0), (100, 0.5)]
    with pytest.raises(SystemExit, match="no training_log.json"):
        package.main(["--run", str(run), "--data", str(tmp_path / "a"), "--out", str(tmp_path / "o"),
                      "--continued-from", str(tmp_path / "a")])
