"""Offline classification with Ray Data on a real two-node Ray cluster (two `ray start` processes on
loopback, one CPU each): `scripts/classify.py --ray ADDRESS` against `scripts/classify.py` alone."""

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from helpers import demo_model_dir, shape_image
from harness.ray_cluster import RayCluster, ray_env
from harness.ts_server import ROOT

pytestmark = pytest.mark.e2e

LABELS = ["circle", "square", "triangle"]
GOOD = 510
BROKEN = {"empty.png": b"", "text.jpg": b"not an image at all", "cut.png": None}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """510 small shape images in nested folders, and three broken files among them."""
    root = tmp_path_factory.mktemp("dataset")
    for i in range(GOOD):
        folder = root / f"part{i % 4}"
        folder.mkdir(exist_ok=True)
        (folder / f"img{i:04d}.png").write_bytes(shape_image(LABELS[i % 3], seed=i, min_side=64, max_side=96))
    for name, data in BROKEN.items():
        whole = shape_image("circle", seed=7, min_side=64, max_side=96)
        (root / "part1" / name).write_bytes(whole[: len(whole) // 2] if data is None else data)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return demo_model_dir(tmp_path_factory.mktemp("data_model") / "shapes", compile=False, batch_size=16)


def classify(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "classify.py"), *map(str, args)],
                          env=ray_env(), capture_output=True, text=True, timeout=900)


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_dataset_on_two_nodes_gives_every_file_once_and_the_library_labels(dataset, model_dir, tmp_path):
    alone = classify(dataset, "--model", model_dir, "--out", tmp_path / "alone.jsonl")
    assert alone.returncode == 1, alone.stderr  # the broken files fail
    want = {row["path"]: row for row in rows_of(tmp_path / "alone.jsonl")}
    assert len(want) == GOOD + len(BROKEN)
    with RayCluster(nodes=2) as cluster:
        done = classify(dataset, "--model", model_dir, "--ray", cluster.address, "--actors", 2,
                        "--out", tmp_path / "ray.jsonl")
        parquet = classify(dataset / "part1", "--model", model_dir, "--ray", cluster.address,
                           "--out", tmp_path / "part1.parquet")
    assert done.returncode == 1, done.stderr[-3000:]
    got = rows_of(tmp_path / "ray.jsonl")
    assert [row["path"] for row in got] == sorted(want) == list(want)  # every file once, in input order
    for row in got:
        expected = want[row["path"]]
        if "error" in expected:
            assert row["error"] == expected["error"] and row["reason"] == expected["reason"], row
        else:
            assert row["label"] == expected["label"], row
            assert row["scores"] == pytest.approx(expected["scores"], abs=1e-4)
    assert sorted(row["path"].rsplit("/", 1)[-1] for row in got if "error" in row) == sorted(BROKEN)
    assert f"{GOOD} classified, {len(BROKEN)} failed" in done.stderr
    assert parquet.returncode == 1, parquet.stderr[-3000:]
    table = pq.read_table(tmp_path / "part1.parquet").to_pylist()
    part1 = {path: row for path, row in want.items() if "/part1/" in path}
    assert sorted(row["path"] for row in table) == sorted(part1)
    for row in table:
        assert row["label"] == part1[row["path"]].get("label") and row["error"] == part1[row["path"]].get("error")
