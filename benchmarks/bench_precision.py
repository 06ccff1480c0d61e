#!/usr/bin/env python
"""The model's forward pass alone, per precision, compiled as the handler compiles it: how bf16
on the CPU was chosen (converted weights against autocast) and what each precision buys.

    .venv/bin/python benchmarks/bench_precision.py [--archs efficientnet_lite0 resnet50 mobilenet_v3_small] \\
        [--modes fp32 bf16 bf16_autocast int8] [--batch 32] [--json docs/results/bench_precision.json]

Each (arch, mode) runs in a fresh process (inductor's settings and caches stay apart), on random
weights (speed does not depend on them), BatchNorm folded, channels_last, torch.compile for the
fixed batch shape, all cores' threads:
    fp32           the handler's fp32 model (compiled without freezing, as served)
    bf16           the handler's bf16 model: weights converted (handler.model.precision.Bf16Model),
                   classifier head in fp32, compiled with freezing
    bf16_autocast  the alternative: fp32 weights under CPU autocast, compiled with freezing
    int8           PT2E (handler.model.quantize) calibrated on random input, compiled with freezing
Prints ms per batch (the best of --repeats after two warm-up calls).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MODES = ("fp32", "bf16", "bf16_autocast", "int8")


def one(arch: str, mode: str, batch: int, repeats: int) -> dict:
    """Runs in a child process."""
    import torch

    from handler.model.architectures import build_model
    from handler.model.optimize import compile_model, fold_batchnorm
    from handler.model.precision import Bf16Model
    from handler.model.quantize import quantize_int8

    torch.manual_seed(0)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    model = build_model(arch, 1000).eval()
    if mode == "int8":
        model = quantize_int8(model, [x]).module()
    else:
        model = fold_batchnorm(model, x[:2]).to(memory_format=torch.channels_last)
        if mode == "bf16":
            model = Bf16Model(model)
    compiled = compile_model(model, "default", freeze=mode != "fp32")

    def forward() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16_autocast"):
            return compiled(x)

    with torch.inference_mode():
        started = time.perf_counter()
        forward()
        compile_s = time.perf_counter() - started
        forward()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            forward()
            times.append(time.perf_counter() - started)
    return {"arch": arch, "mode": mode, "batch": batch, "ms": round(min(times) * 1000, 1),
            "first_call_s": round(compile_s, 1), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["efficientnet_lite0", "resnet50", "mobilenet_v3_small"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.child[0], args.child[1], args.batch, args.repeats)))
        return
    rows = []
    for arch in args.archs:
        for mode in args.modes:
            run = subprocess.run([sys.executable, __file__, "--child", arch, mode, "--batch", str(args.batch),
                                  "--repeats", str(args.repeats)], capture_output=True, text=True)
            lines = run.stdout.strip().splitlines()
            row = json.loads(lines[-1]) if run.returncode == 0 and lines else {
                "arch": arch, "mode": mode, "error": (run.stderr.strip().splitlines() or ["?"])[-1][:200]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n| model | {' | '.join(args.modes)} |\n|---|" + "---|" * len(args.modes))
    for arch in args.archs:
        cells = []
        for mode in args.modes:
            row = next(r for r in rows if r["arch"] == arch and r["mode"] == mode)
            cells.append(f"{row['ms']} ms" if "ms" in row else f"fails: {row['error']}")
        print(f"| {arch} | {' | '.join(cells)} |")
    if args.json:
        args.json.write_text(json.dumps({"batch": args.batch, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
