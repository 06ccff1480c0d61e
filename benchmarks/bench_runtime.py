#!/usr/bin/env python
"""The model's forward pass alone, per runtime and precision, each prepared exactly as the
handler prepares it (``handler.model.runner.ModelRunner``): which runtime ``handler.runtime: auto``
should pick, and what bf16 and int8 buy on each.

    .venv/bin/python benchmarks/bench_runtime.py [--archs efficientnet_lite0 resnet50 mobilenet_v3_small] \\
        [--modes torch/fp32 torch/bf16 openvino/fp32 openvino/bf16] [--runs 3] [--batch 32] \\
        [--json docs/results/bench_runtime.json]

torch: BatchNorm folded, channels_last, torch.compile (bf16: weights converted, frozen);
openvino: the same fp32 model converted (from the cache after its first run), compiled with the
precision hint; int8 (``--modes openvino/int8 torch/int8``): quantized as build_mar.py does (NNCF
or PT2E) on 64 benchmark photos before the timed start-up. efficientnet_lite0 runs its real weights, the others random ones (speed does not
depend on them). Each (run, arch, mode) is a fresh process, runs interleaved (run 1 of every
mode, then run 2, ...), all cores' threads. Prints per mode the median of the runs' ms per batch
(each run: the median of --repeats calls after two warm-up calls), their min and max, and the
start-up (model prepared and warmed, compile or conversion included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("torch/fp32", "torch/bf16", "openvino/fp32", "openvino/bf16", "openvino/int8", "torch/int8")
DEFAULT_MODES = MODES[:4]


def int8_artifacts(config, weights: Path, runtime: str, folder: Path):
    """The int8 model of ``runtime``, calibrated on 64 benchmark photos, with a record that vouches
    for it (speed only: the accuracy gate is build_mar.py's)."""
    import torch

    from handler.decode.path import model_inputs
    from handler.model.loading import load_model
    from handler.model.ov_runtime import INT8_IR, quantize_openvino
    from handler.model.quantize import INT8_PROGRAM, quantize_int8, save_program
    from handler.model.records import Candidate, GateRecord, ModelArtifacts, weights_sha256
    from harness.bench_images import photo_jpegs

    digest = weights_sha256(weights)
    batches = list(torch.cat([model_inputs(config, [jpeg]) for jpeg in photo_jpegs("640x480", 64)]).split(32))
    folder.mkdir(parents=True, exist_ok=True)
    record = GateRecord(digest, 0, "speed only", 0.0, (Candidate("int8", runtime, 0, 0, 0, 0, 0, 0, True),))
    if runtime == "openvino":
        quantize_openvino(config, weights, 1000, digest, batches, folder)
        return ModelArtifacts(openvino_int8=(folder / INT8_IR[0], folder / INT8_IR[1]), gate_record=record)
    save_program(quantize_int8(load_model(config.arch, weights, 1000), batches), folder / INT8_PROGRAM)
    return ModelArtifacts(int8_program=folder / INT8_PROGRAM, gate_record=record)


def one(arch: str, mode: str, batch: int, repeats: int, work: Path) -> dict:
    """Runs in a child process."""
    import torch

    from handler.config import HandlerConfig
    from handler.model.records import ModelArtifacts
    from handler.model.runner import ModelRunner

    torch.set_flush_denormal(True)
    runtime, precision = mode.split("/")
    if arch == "efficientnet_lite0":
        import yaml

        lite0 = ROOT / "models" / "efficientnet_lite0"
        settings = yaml.safe_load((lite0 / "model-config.yaml").read_text())["handler"]
        weights = lite0 / "efficientnet_lite0.pth"
    else:
        from handler.model.architectures import build_model

        settings = {"arch": arch}
        weights = work / f"{arch}.pt"
        if not weights.is_file():
            torch.manual_seed(0)
            torch.save(build_model(arch, 1000).state_dict(), weights)
    config = HandlerConfig.from_mapping({**settings, "precision": precision, "runtime": runtime,
                                         "batch_size": batch, "batch_buckets": [batch], "compile": True})
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)

    def normalize(pixels: torch.Tensor) -> torch.Tensor:
        return ((pixels.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)

    artifacts = ModelArtifacts()
    if precision == "int8":  # quantized as build_mar.py does, on 64 photos; not part of the start-up time
        artifacts = int8_artifacts(config, weights, runtime, work / f"{arch}-{runtime}-int8")
    started = time.perf_counter()
    runner = ModelRunner(config, weights, 1000, torch.device("cpu"), artifacts)
    runner.warm_up(normalize)
    startup_s = time.perf_counter() - started
    if (runner.runtime, runner.precision) != (runtime, precision):
        raise RuntimeError(f"ran {runner.runtime}/{runner.precision}, not {mode}")
    size = config.image_size
    x = normalize(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                                generator=torch.Generator().manual_seed(0)))
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            t = time.perf_counter()
            runner.forward(x)
            if i >= 2:
                times.append(time.perf_counter() - t)
    return {"arch": arch, "mode": mode, "ms": round(statistics.median(times) * 1000, 1),
            "startup_s": round(startup_s, 1), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["efficientnet_lite0", "resnet50", "mobilenet_v3_small"])
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=MODES)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        arch, mode, work = args.child
        print(json.dumps(one(arch, mode, args.batch, args.repeats, Path(work))))
        return
    from harness.machine import machine

    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_runtime_") as work:
        for run in range(args.runs):
            for arch in args.archs:
                for mode in args.modes:
                    done = subprocess.run([sys.executable, __file__, "--child", arch, mode, work, "--batch",
                                           str(args.batch), "--repeats", str(args.repeats)],
                                          capture_output=True, text=True)
                    lines = done.stdout.strip().splitlines()
                    row = json.loads(lines[-1]) if done.returncode == 0 and lines else {
                        "arch": arch, "mode": mode, "error": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
                    rows.append({"run": run + 1, **row})
                    print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for arch in args.archs:
        for mode in args.modes:
            ms = [r["ms"] for r in rows if r["arch"] == arch and r["mode"] == mode and "ms" in r]
            starts = [r["startup_s"] for r in rows if r["arch"] == arch and r["mode"] == mode and "ms" in r]
            summary[f"{arch} {mode}"] = ({"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms),
                                          "runs": len(ms), "startup_s": starts} if ms else {"error": "failed"})
    print(f"\nms per batch of {args.batch} (median of {args.runs} runs, min-max)\n")
    print(f"| model | {' | '.join(args.modes)} |\n|---|" + "---|" * len(args.modes))
    for arch in args.archs:
        cells = []
        for mode in args.modes:
            s = summary[f"{arch} {mode}"]
            cells.append(f"{s['median_ms']} ({s['min_ms']}-{s['max_ms']})" if "median_ms" in s else "fails")
        print(f"| {arch} | {' | '.join(cells)} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"batch": args.batch, "runs": args.runs, "machine": machine(),
                                         "summary": summary, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
