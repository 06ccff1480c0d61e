#!/usr/bin/env python
"""Time to READY of TorchServe serving a shipped archive, per runtime: torch eager (as on a
machine without a C++ compiler), torch compiled with a cold inductor cache and again warm, and
OpenVINO (the default on a CPU) converting into an empty cache and again from it.

    .venv/bin/python benchmarks/startup_time.py [--mars model_store/shapes.mar model_store/efficientnet_lite0.mar]
                                             [--runs 3] [--json docs/results/startup_time.json]

Each start is a fresh TorchServe (Java frontend + one Python worker) from a temp dir, one model at
a time; "READY" is what the management API reports, so it includes starting the JVM and the
worker, loading the model, forking the loader workers and compiling or converting. The torch
variants serve a copy of the archive whose model-config.yaml says ``runtime: torch``. Each
variant runs --runs times (each cold run with a cache of its own); the table gives the median
and the min-max.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from harness.archives import with_settings
from harness.machine import machine
from harness.ts_server import start_server

ROOT = Path(__file__).resolve().parent.parent

# name -> (runtime, environment given a fresh cache folder, whether the cache is the previous run's)
VARIANTS = {
    "torch eager (no C++ compiler)": ("torch", lambda cache: {"CXX": "/nonexistent/g++"}, False),
    "torch compiled, cold cache": ("torch", lambda cache: {"TORCHINDUCTOR_CACHE_DIR": cache}, False),
    "torch compiled, warm cache": ("torch", lambda cache: {"TORCHINDUCTOR_CACHE_DIR": cache}, True),
    "OpenVINO, cold cache": ("openvino", lambda cache: {"HANDLER_CACHE_DIR": cache}, False),
    "OpenVINO, warm cache": ("openvino", lambda cache: {"HANDLER_CACHE_DIR": cache}, True),
}


def time_to_ready(mar: Path, env: dict[str, str]) -> tuple[float, str]:
    """Seconds from starting TorchServe to the model's READY worker, and how the model was prepared."""
    with tempfile.TemporaryDirectory(prefix="startup_") as tmp:
        started = time.perf_counter()
        server = start_server(Path(tmp), mar.parent, [mar.name], env=env)
        seconds = time.perf_counter() - started
        server.stop()
        log = (Path(tmp) / "logs" / "model_log.log").read_text()
    line = next((m.group(0) for m in re.finditer(r"(torch\.compile|OpenVINO model) .*", log)), "")
    return seconds, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mars", nargs="+", type=Path,
                        default=[ROOT / "model_store" / "shapes.mar", ROOT / "model_store" / "efficientnet_lite0.mar"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="startup_stores_") as stores:
        for mar in args.mars:
            copies = {}
            for runtime in ("torch", "openvino"):
                copies[runtime] = with_settings(mar, {"runtime": runtime}, Path(stores) / runtime)
            for run in range(args.runs):
                cache = tempfile.mkdtemp(prefix="startup_cache_")
                for variant, (runtime, env, warm) in VARIANTS.items():
                    if not warm:
                        shutil.rmtree(cache, ignore_errors=True)
                        Path(cache).mkdir()
                    seconds, line = time_to_ready(copies[runtime], env(cache))
                    rows.append({"model": mar.stem, "variant": variant, "run": run + 1, "ready_s": round(seconds, 1),
                                 "log": line[:300]})
                    print(json.dumps(rows[-1]), flush=True)
                shutil.rmtree(cache, ignore_errors=True)
    print(f"\n| model | {' | '.join(VARIANTS)} |\n|---|" + "---|" * len(VARIANTS))
    summary = {}
    for mar in args.mars:
        cells = []
        for variant in VARIANTS:
            times = [r["ready_s"] for r in rows if r["model"] == mar.stem and r["variant"] == variant]
            summary[f"{mar.stem} {variant}"] = {"median_s": statistics.median(times), "min_s": min(times),
                                                 "max_s": max(times)}
            cells.append(f"{statistics.median(times)} s ({min(times)}-{max(times)})")
        print(f"| {mar.stem} | {' | '.join(cells)} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "summary": summary, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
