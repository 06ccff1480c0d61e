"""scripts/classify.py, the offline front door: real files in, JSON lines out, no server."""

import json
import subprocess
import sys

from handler.classifier import ImageClassifier
from helpers import shape_image
from harness.ts_server import ROOT

DEMO = ROOT / "models" / "shapes"


def run_classify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "classify.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_folders_and_globs_are_classified_one_line_each_and_failures_set_the_exit_status(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    images = {}
    for i, label in enumerate(["circle", "square", "triangle"] * 3):
        path = folder / ("sub" if i % 2 else "") / f"{i:02d}_{label}.jpg"
        path.write_bytes(shape_image(label, 7000 + i, fmt="JPEG", size_range=(0.4, 0.8)))
        images[str(path)] = path.read_bytes()
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    extra = tmp_path / "extra_square.png"
    extra.write_bytes(shape_image("square", 7100))
    images[str(extra)] = extra.read_bytes()
    with ImageClassifier.load(DEMO, device="cpu") as clf:
        expected = dict(zip(images, clf.classify(list(images.values()))))

    out = tmp_path / "results.jsonl"
    run = run_classify(str(folder), str(tmp_path / "extra_*.png"), "--model", str(DEMO), "--out", str(out),
                       "--batch-size", "3", "--device", "cpu")
    assert run.returncode == 1, run.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 11
    by_path = {line["path"]: line for line in lines}
    broken = by_path.pop(str(folder / "broken.png"))
    assert broken["error"] == "invalid_image" and broken["reason"]
    assert set(by_path) == set(expected)
    for path, line in by_path.items():
        assert line["scores"] == expected[path] and line["label"] == next(iter(expected[path]))
    assert "10 classified, 1 failed" in run.stderr and "broken.png" in run.stderr

    good = run_classify(str(extra), "--model", str(DEMO), "--out", str(out))
    assert good.returncode == 0, good.stderr
    assert [json.loads(x)["label"] for x in out.read_text().splitlines()] == [next(iter(expected[str(extra)]))]


def test_a_missing_model_or_path_is_a_clear_error(tmp_path):
    run = run_classify(str(tmp_path), "--model", str(tmp_path / "nope"))
    assert run.returncode != 0 and "neither a model directory nor a .mar" in run.stderr
    run = run_classify(str(tmp_path / "missing.jpg"), "--model", str(DEMO))
    assert run.returncode != 0 and "no such file or folder" in run.stderr


def test_a_local_run_writes_parquet_too_with_the_same_rows(tmp_path):
    """The offline job's one writer: Parquet from a local run as from a Ray run."""
    from handler.offline import read_rows

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, label in enumerate(["circle", "square", "triangle"]):
        (folder / f"{i}_{label}.png").write_bytes(shape_image(label, 7200 + i))
    (folder / "z_broken.png").write_bytes(b"not an image")
    runs = {suffix: run_classify(str(folder), "--model", str(DEMO), "--out", str(tmp_path / f"out{suffix}"))
            for suffix in (".jsonl", ".parquet")}
    assert all(run.returncode == 1 for run in runs.values()), [run.stderr for run in runs.values()]
    jsonl, parquet = read_rows(tmp_path / "out.jsonl"), read_rows(tmp_path / "out.parquet")
    assert parquet == jsonl and len(jsonl) == 4 and jsonl[-1]["error"] == "invalid_image"
    assert run_classify(str(folder), "--model", str(DEMO), "--out", str(tmp_path / "out.csv")).returncode != 0
