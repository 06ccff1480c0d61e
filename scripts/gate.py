#!/usr/bin/env python
"""Measure a model's reduced precisions on labelled images and write its gate record.

    .venv/bin/python scripts/gate.py --model DIR_OR_MAR --eval DIR_OR_CSV [--candidates torch/bf16 openvino/bf16]
                                     [--calibrate DIR] [--write] [--json OUT] [--source TEXT]

--eval: one sub-folder per label (named by the label or its class index), or a CSV of
``path,label``; held-out images, not the ones the model learned from or int8 calibrated on.
fp32 on torch is the reference; each candidate (runtime/precision) is served as a server serves
it, and its top-1 accuracy compared (``handler.evaluate``). A candidate passes when it loses at
most 0.5 point of top-1; the figures come with the image count and a 95 % bound.
--calibrate DIR (a model folder only): quantize the model to int8 for OpenVINO (NNCF) with its
activation ranges observed on those images (other images than --eval's), and gate it too
(candidate openvino/int8); with --write the int8 model (``openvino_int8.xml``/``.bin``) stays in
the folder. --write puts ``gate_record.json`` beside the weights of a model folder: ``precision:
auto`` then runs the fastest reduced precision that passed on its runtime (int8, then bf16), for
these weights only. An archive gets its record
from ``build_mar.py --eval``. Exit status 1 when a candidate fails.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from handler.evaluate import MAX_CALIBRATION_IMAGES, calibration_batches, evaluate, labelled_images
from handler.model.files import ModelSpec, read_model
from handler.model.ov_runtime import INT8_IR, openvino_problem, quantize_openvino
from handler.model.records import GATE_RECORD, weights_sha256
from handler.offline import expand


def default_candidates() -> list[str]:
    """bf16 on each runtime installed here."""
    return ["torch/bf16"] + (["openvino/bf16"] if openvino_problem() is None else [])


def quantize(spec: ModelSpec, calibrate: Path, images: list[tuple[Path, int]],
             folder: Path) -> tuple[Path, Path]:
    """OpenVINO's int8 model of ``spec``, calibrated on the images under ``calibrate`` (none of
    them an --eval image), written to ``folder``."""
    files = expand([str(calibrate)])[:MAX_CALIBRATION_IMAGES]
    held_out = {hashlib.sha256(p.read_bytes()).hexdigest() for p, _ in images}
    if len(files) < 2 or any(hashlib.sha256(p.read_bytes()).hexdigest() in held_out for p in files):
        raise SystemExit(f"gate: --calibrate {calibrate}: needs at least 2 images, none of them an --eval image")
    try:
        batches = calibration_batches(spec.config, [p.read_bytes() for p in files], skipped=lambda reason: print(
            f"gate: skipping an unreadable calibration image: {reason}", file=sys.stderr))
    except ValueError as exc:
        raise SystemExit(f"gate: --calibrate {calibrate}: {exc}") from None
    quantize_openvino(spec.config, spec.weights, len(spec.labels), weights_sha256(spec.weights), batches, folder)
    print(f"gate: int8 (OpenVINO, NNCF) calibrated on {sum(len(b) for b in batches)} images from {calibrate}",
          file=sys.stderr)
    return folder / INT8_IR[0], folder / INT8_IR[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--eval", type=Path, required=True, metavar="DIR_OR_CSV")
    parser.add_argument("--candidates", nargs="+", default=None, metavar="RUNTIME/PRECISION")
    parser.add_argument("--write", action="store_true", help=f"write {GATE_RECORD} into the model folder")
    parser.add_argument("--json", type=Path, help="also write the record here")
    parser.add_argument("--source", help="how the record names the images (default: the --eval path)")
    parser.add_argument("--calibrate", type=Path, metavar="DIR", help="images to quantize OpenVINO's int8 on")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    candidates = []
    for item in args.candidates or default_candidates():
        runtime, _, precision = item.partition("/")
        if runtime not in ("torch", "openvino") or precision not in ("bf16", "int8"):
            parser.error(f"--candidates: {item!r} is not torch/bf16, torch/int8, openvino/bf16 or openvino/int8")
        candidates.append((precision, runtime))
    if (args.write or args.calibrate) and not args.model.is_dir():
        parser.error("--write and --calibrate work on a model folder; an archive gets its record from "
                     "build_mar.py --eval")
    try:
        spec = read_model(args.model)
        images = labelled_images(args.eval, spec.labels)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"gate: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="gate_int8_") as tmp:
        if args.calibrate:
            folder = args.model if args.write else Path(tmp)
            spec = replace(spec, openvino_int8=quantize(spec, args.calibrate, images, folder))
            if ("int8", "openvino") not in candidates:
                candidates.append(("int8", "openvino"))
        record = evaluate(spec, images, candidates, args.source or str(args.eval),
                          progress=lambda line: print(f"gate: {line}", file=sys.stderr))
    if args.write:
        (args.model / GATE_RECORD).write_text(record.to_json())
        print(f"gate: wrote {args.model / GATE_RECORD}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(record.to_json())
    print(record.to_json(), end="")
    sys.exit(0 if all(c.passed for c in record.candidates) else 1)


if __name__ == "__main__":
    main()
