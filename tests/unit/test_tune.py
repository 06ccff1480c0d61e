import subprocess
import sys
from pathlib import Path

import yaml
from PIL import Image

from helpers import encode

ROOT = Path(__file__).resolve().parents[2]


def test_tune_sweeps_and_writes_the_fastest_combination(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"{i}.png").write_bytes(encode(Image.new("RGB", (80 + i, 60), (i * 50, 90, 200))))
    start = tmp_path / "model-config.yaml"
    start.write_text(yaml.safe_dump({"responseTimeout": 60, "handler": {"image_size": 32, "resize_size": 40}}))
    out = tmp_path / "tuned.yaml"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "tune.py"), "--arch", "shapes_cnn", "--labels-count", "3",
         "--images", str(images), "--images-per-request", "4", "--batch-sizes", "2", "--workers", "0",
         "--backend-workers", "1", "2", "--precisions", "fp32", "bf16", "--runtimes", "torch", "openvino", "--seconds", "0.5", "--config", str(start), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    # 2 backend-worker counts x 1 batch size x 1 loader-worker count x (torch x compile, openvino) x precision
    assert len(rows) == 12
    speeds = {(*(int(c) for c in line.split("|")[1:4]), *(c.strip() for c in line.split("|")[4:7])):
              float(line.split("|")[7]) for line in rows}
    assert {key[3] for key in speeds} == {"torch", "openvino"} and {key[5] for key in speeds} == {"fp32", "bf16"}
    assert {key[4] for key in speeds if key[3] == "torch"} == {"false", "auto"}
    tuned = yaml.safe_load(out.read_text())
    best = max(speeds, key=speeds.get)
    compiled = {False: "false", "auto": "auto", True: "true"}[tuned["handler"]["compile"]]
    assert (tuned["maxWorkers"], tuned["handler"]["batch_size"], tuned["handler"]["num_workers"],
            tuned["handler"]["runtime"], compiled, tuned["handler"]["precision"]) == best
    assert tuned["minWorkers"] == tuned["maxWorkers"]
    assert tuned["responseTimeout"] == 60 and tuned["handler"]["image_size"] == 32  # the rest is kept
