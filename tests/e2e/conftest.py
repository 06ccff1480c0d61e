import json
import subprocess
import sys

import pytest
import torch
import torchvision

from harness.ts_server import ROOT, start_server



@pytest.fixture(scope="session")
def model_store(tmp_path_factory):
    """Archives built fresh from this checkout (a stale model_store/shapes.mar would test old
    handler code): the shipped models (efficientnet_lite0, the shapes demo), a resnet18 with random
    weights, the demo as TorchScript and .pt2."""
    store = tmp_path_factory.mktemp("model_store")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_mar.py"), "--export-path", str(store)], check=True)
    work = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    labels = {str(i): f"class_{i}" for i in range(10)}
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), work / "weights.pth")
    (work / "index_to_name.json").write_text(json.dumps(labels))
    # Eager: compiling it at start-up would only lengthen the suite (the shipped archives compile).
    (work / "config.yaml").write_text("startupTimeout: 600\nhandler:\n  compile: false\n")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_mar.py"), "--arch", "resnet18",
         "--weights", str(work / "weights.pth"), "--labels", str(work / "index_to_name.json"),
         "--name", "resnet_random", "--export-path", str(store), "--config", str(work / "config.yaml")],
        check=True,
    )
    build_demo_in_other_formats(store, tmp_path_factory.mktemp("formats"))
    return store


def build_demo_in_other_formats(store, work):
    """The demo weights as a TorchScript file and a torch.export program, archived with the demo's
    handler settings: shapes_ts.mar and shapes_pt2.mar."""
    import warnings

    import yaml

    from handler.model.architectures import ShapesNet

    demo = ROOT / "models" / "shapes"
    model = ShapesNet(num_classes=3)
    model.load_state_dict(torch.load(demo / "shapes_cnn.pt", weights_only=True))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(model).save(str(work / "shapes.pt"))
    example = torch.zeros(2, 3, 128, 128)
    batch = torch.export.Dim("batch", max=1024)
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), str(work / "shapes.pt2"))
    config = yaml.safe_load((demo / "model-config.yaml").read_text())
    config["handler"]["compile"] = False  # the shipped shapes.mar is the compiled one
    for arch, weights, name in (("torchscript", "shapes.pt", "shapes_ts"), ("torch_export", "shapes.pt2", "shapes_pt2")):
        config["handler"]["arch"] = arch
        (work / f"{name}.yaml").write_text(yaml.safe_dump(config))
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "build_mar.py"), "--arch", arch, "--weights", str(work / weights),
             "--labels", str(demo / "index_to_name.json"), "--name", name, "--export-path", str(store),
             "--config", str(work / f"{name}.yaml")],
            check=True,
        )


@pytest.fixture(scope="session")
def server(model_store, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("torchserve")
    instance = start_server(workdir, model_store,
                            ["shapes.mar", "resnet_random.mar", "shapes_ts.mar", "shapes_pt2.mar", "efficientnet_lite0.mar"])
    try:
        yield instance
    finally:
        instance.stop()
