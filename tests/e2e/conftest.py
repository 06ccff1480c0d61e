import json
import shutil
import subprocess
import sys

import pytest
import torch
import torchvision

from ts_server import ROOT, start_server

SHAPES_MAR = ROOT / "model_store" / "shapes.mar"


@pytest.fixture(scope="session")
def model_store(tmp_path_factory):
    """shapes.mar (built by scripts/test.sh) plus a resnet18 .mar with random weights, built here."""
    if not SHAPES_MAR.is_file():
        pytest.fail(f"{SHAPES_MAR} is missing: run scripts/build_mar.py (scripts/test.sh does)")
    store = tmp_path_factory.mktemp("model_store")
    shutil.copy(SHAPES_MAR, store / "shapes.mar")
    work = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    labels = {str(i): f"class_{i}" for i in range(10)}
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), work / "weights.pth")
    (work / "index_to_name.json").write_text(json.dumps(labels))
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_mar.py"), "--arch", "resnet18",
         "--weights", str(work / "weights.pth"), "--labels", str(work / "index_to_name.json"),
         "--name", "resnet_random", "--export-path", str(store)],
        check=True,
    )
    return store


@pytest.fixture(scope="session")
def server(model_store, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("torchserve")
    instance = start_server(workdir, model_store, ["shapes.mar", "resnet_random.mar"])
    try:
        yield instance
    finally:
        instance.stop()
