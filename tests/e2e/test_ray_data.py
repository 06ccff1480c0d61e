"""Offline classification with Ray Data on a real two-node Ray cluster (two `ray start` processes on
loopback, one CPU each): `scripts/classify.py --ray ADDRESS` against `scripts/classify.py` alone, and
with one of its actors killed mid-job."""

import json
import re
import subprocess
import sys
import time

import psutil
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


def test_an_actor_killed_mid_job_still_gives_every_file_exactly_once_and_both_nodes_worked(model_dir, tmp_path):
    """Ray restarts a dead classifier actor and runs its batches again; the job's rows still hold
    every file exactly once, with the same answers, and the summary names both nodes."""
    root = tmp_path / "many"
    for i in range(3000):
        folder = root / f"part{i % 6}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:05d}.png").write_bytes(shape_image(LABELS[i % 3], seed=1000 + i, min_side=64, max_side=80))
    alone = classify(root, "--model", model_dir, "--out", tmp_path / "alone.jsonl")
    assert alone.returncode == 0, alone.stderr[-3000:]
    want = {row["path"]: row for row in rows_of(tmp_path / "alone.jsonl")}
    out = tmp_path / "ray.jsonl"
    with RayCluster(nodes=2) as cluster:
        job = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "classify.py"), str(root), "--model",
                                str(model_dir), "--ray", cluster.address, "--actors", "2", "--out", str(out)],
                               env=ray_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        victim, written_at_kill = None, None
        deadline = time.monotonic() + 600
        while victim is None and job.poll() is None and time.monotonic() < deadline:
            written = len(out.read_text().splitlines()) if out.exists() else 0
            actors = classifier_actors()
            if written and len(actors) == 2:  # both actors up, rows coming: mid-job
                victim, written_at_kill = actors[0], written
                victim.kill()
            time.sleep(0.05)
        _, stderr = job.communicate(timeout=900)
    assert victim is not None, f"the job ended before an actor could be killed: {stderr[-3000:]}"
    assert written_at_kill < len(want), "the kill came after the last row"
    assert job.returncode == 0, stderr[-3000:]
    got = rows_of(out)
    assert [row["path"] for row in got] == sorted(want), "not every file exactly once, in order"
    for row in got:
        assert row["label"] == want[row["path"]]["label"], row
        assert row["scores"] == pytest.approx(want[row["path"]]["scores"], abs=1e-4)
    summary = [line for line in stderr.splitlines() if "Ray node" in line]
    print(f"killed actor {victim.pid} after {written_at_kill} of {len(want)} rows; {summary}")
    assert summary and "on 2 Ray nodes" in summary[-1], stderr[-3000:]
    for ip in cluster.node_ips:
        assert re.search(rf"{re.escape(ip)} \(\d+ files\)", summary[-1]), summary


def classifier_actors() -> list[psutil.Process]:
    """The processes of Ray Data's classifier actors (not their loader workers, which share the
    actor's process title), oldest first."""
    found = []
    for process in psutil.process_iter(["cmdline", "ppid", "create_time"]):
        title = " ".join(process.info["cmdline"] or [])
        if "ClassifyBatch" in title:
            found.append(process)
    pids = {p.pid for p in found}
    return sorted((p for p in found if p.info["ppid"] not in pids), key=lambda p: p.info["create_time"])
