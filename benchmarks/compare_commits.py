#!/usr/bin/env python
"""Old code against new in ONE TorchServe: the speed check for a refactor.

Builds the same weights and settings into two archives, one with the handler package of git
revision ``--base`` (checked out in a temporary worktree) and one with this tree's, serves both
from one TorchServe (one worker each) and sends 32-photo requests to each in interleaved rounds,
as multipart/mixed and as a form upload. Prints images/s, p50 and new/old, and checks that both
answer the same scores.

    .venv/bin/python benchmarks/compare_commits.py --base be463b9 [--rounds 40] [--arch mobilenet_v3_small]

The settings are the ones both revisions understand (``--handler-json``, default: batch 16, eager).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from harness.bench_images import photo_jpegs
from benchmark import send_ours
from harness.model_dirs import random_model_dir
from harness.timing import timed_ms
from harness.ts_server import start_server

ROOT = Path(__file__).resolve().parent.parent


def build(root: Path, name: str, model_dir: Path, arch: str, config: Path, store: Path) -> None:
    """An archive of ``model_dir`` with the handler package of the tree at ``root``."""
    # That tree's own handler package, not the installed one: its build_mar imports it.
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, str(root / "scripts" / "build_mar.py"), "--arch", arch,
                    "--weights", str(model_dir / "weights.pt"), "--labels", str(model_dir / "index_to_name.json"),
                    "--name", name, "--export-path", str(store), "--config", str(config)],
                   check=True, capture_output=True, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the old revision (a commit, tag or branch)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--arch", default="mobilenet_v3_small")
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--handler-json", default='{"batch_size": 16, "compile": false}')
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="compare_"))
    old_tree = work / "old"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_tree), args.base],
                   check=True, capture_output=True)
    try:
        model_dir = random_model_dir(work / "model", args.arch)
        handler = {"arch": args.arch, **json.loads(args.handler_json)}
        config = work / "model-config.yaml"
        config.write_text(yaml.safe_dump({"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 10,
                                          "responseTimeout": 120, "startupTimeout": 600, "handler": handler}))
        store = work / "store"
        store.mkdir()
        build(old_tree, "old", model_dir, args.arch, config, store)
        build(ROOT, "new", model_dir, args.arch, config, store)
        (work / "server").mkdir()
        server = start_server(work / "server", store, ["old.mar", "new.mar"])
        try:
            images = photo_jpegs(args.size, 32)
            old_answer, new_answer = (send_ours(server, images, name) for name in ("old", "new"))
            diff = max(abs(a[k] - b.get(k, 0.0)) for a, b in zip(old_answer, new_answer) for k in a)
            warm_until = time.time() + 20
            while time.time() < warm_until:
                for name in ("old", "new"):
                    send_ours(server, images, name)
            slots = [("old", False), ("new", False), ("old", True), ("new", True)]
            latencies: dict[tuple[str, bool], list[float]] = {slot: [] for slot in slots}
            for round_ in range(args.rounds):  # reversed every other round: drift hits both alike
                for name, form in slots if round_ % 2 == 0 else reversed(slots):
                    latencies[(name, form)].append(timed_ms(lambda: send_ours(server, images, name, form_data=form)))
        finally:
            server.stop()
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], capture_output=True)

    result: dict = {"base": args.base, "arch": args.arch, "size": args.size, "handler": handler,
                    "rounds": args.rounds, "max_score_diff": diff}
    for (name, form), values in latencies.items():
        result[f"{name} {'form' if form else 'mixed'}"] = {
            "images_per_s": round(32000 / statistics.mean(values), 1), "p50_ms": round(statistics.median(values), 1)}
    for encoding in ("mixed", "form"):
        old, new = result[f"old {encoding}"], result[f"new {encoding}"]
        result[f"new/old {encoding}"] = {"throughput": round(new["images_per_s"] / old["images_per_s"], 3),
                                         "p50_old_over_new": round(old["p50_ms"] / new["p50_ms"], 3)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
