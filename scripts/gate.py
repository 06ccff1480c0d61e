#!/usr/bin/env python
"""Measure a model's reduced precisions on labelled images and write its gate record.

    .venv/bin/python scripts/gate.py --model DIR_OR_MAR --eval DIR_OR_CSV [--candidates torch/bf16 openvino/bf16]
                                     [--write] [--json OUT] [--source TEXT]

--eval: one sub-folder per label (named by the label or its class index), or a CSV of
``path,label``; held-out images, not the ones the model learned from or int8 calibrated on.
fp32 on torch is the reference; each candidate (runtime/precision) is served as a server serves
it, and its top-1 accuracy compared (``handler.evaluate``). A candidate passes when it loses at
most 0.5 point of top-1; the figures come with the image count and a 95 % bound.
--write puts ``gate_record.json`` beside the weights of a model folder: ``precision: auto`` then
runs the bf16 that passed, on that runtime, for these weights only. An archive gets its record
from ``build_mar.py --eval``. Exit status 1 when a candidate fails.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from handler.evaluate import evaluate, labelled_images
from handler.model.files import read_model
from handler.model.ov_runtime import openvino_problem
from handler.model.records import GATE_RECORD


def default_candidates() -> list[str]:
    """bf16 on each runtime installed here."""
    return ["torch/bf16"] + (["openvino/bf16"] if openvino_problem() is None else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--eval", type=Path, required=True, metavar="DIR_OR_CSV")
    parser.add_argument("--candidates", nargs="+", default=None, metavar="RUNTIME/PRECISION")
    parser.add_argument("--write", action="store_true", help=f"write {GATE_RECORD} into the model folder")
    parser.add_argument("--json", type=Path, help="also write the record here")
    parser.add_argument("--source", help="how the record names the images (default: the --eval path)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    candidates = []
    for item in args.candidates or default_candidates():
        runtime, _, precision = item.partition("/")
        if runtime not in ("torch", "openvino") or precision not in ("bf16", "int8"):
            parser.error(f"--candidates: {item!r} is not torch/bf16, torch/int8 or openvino/bf16")
        candidates.append((precision, runtime))
    if args.write and not args.model.is_dir():
        parser.error("--write writes into a model folder; an archive gets its record from build_mar.py --eval")
    try:
        spec = read_model(args.model)
        images = labelled_images(args.eval, spec.labels)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"gate: {exc}") from None
    record = evaluate(spec, images, candidates, args.source or str(args.eval), progress=lambda line: print(f"gate: {line}",
                                                                                              file=sys.stderr))
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
