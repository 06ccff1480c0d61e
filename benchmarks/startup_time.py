#!/usr/bin/env python
"""Time to READY of TorchServe serving a shipped archive: eager (as on a machine without a C++
compiler), compiled with a cold inductor cache, and compiled again with that cache warm.

    .venv/bin/python benchmarks/startup_time.py [--mars model_store/shapes.mar model_store/efficientnet_lite0.mar]
                                             [--json docs/results/startup_time.json]

Each start is a fresh TorchServe (Java frontend + one Python worker) from a temp dir, one model at
a time; "READY" is what the management API reports, so it includes starting the JVM and the
worker, loading the model, forking the loader workers and compiling the batch buckets.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

from harness.ts_server import start_server

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "eager (no C++ compiler)": lambda cache: {"CXX": "/nonexistent/g++", "TORCHINDUCTOR_CACHE_DIR": cache},
    "compiled, cold cache": lambda cache: {"TORCHINDUCTOR_CACHE_DIR": cache},
    "compiled, warm cache": lambda cache: {"TORCHINDUCTOR_CACHE_DIR": cache},
}


def time_to_ready(mar: Path, env: dict[str, str]) -> tuple[float, str]:
    """Seconds from starting TorchServe to the model's READY worker, and the handler's compile line."""
    with tempfile.TemporaryDirectory(prefix="startup_") as tmp:
        started = time.perf_counter()
        server = start_server(Path(tmp), mar.parent, [mar.name], env=env)
        seconds = time.perf_counter() - started
        server.stop()
        log = (Path(tmp) / "logs" / "model_log.log").read_text()
    line = next((m.group(0) for m in re.finditer(r"torch\.compile .*", log)), "")
    return seconds, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mars", nargs="+", type=Path,
                        default=[ROOT / "model_store" / "shapes.mar", ROOT / "model_store" / "efficientnet_lite0.mar"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for mar in args.mars:
        with tempfile.TemporaryDirectory(prefix="inductor_cache_") as cache:
            for variant, env in VARIANTS.items():
                seconds, line = time_to_ready(mar, env(cache))
                rows.append({"model": mar.stem, "variant": variant, "ready_s": round(seconds, 1), "log": line})
                print(json.dumps(rows[-1]), flush=True)
    print("\n| model | eager (no C++ compiler) | compiled, cold cache | compiled, warm cache |\n|---|---|---|---|")
    for mar in args.mars:
        cells = [f"{r['ready_s']} s" for r in rows if r["model"] == mar.stem]
        print(f"| {mar.stem} | {' | '.join(cells)} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
