"""TorchServe's own gRPC client, as its users build it: stubs generated from its inference.proto."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

PROTOS = Path(__file__).resolve().parent / "protos"


def build_stubs(out: Path) -> tuple[ModuleType, ModuleType]:
    """``inference_pb2`` and ``inference_pb2_grpc``, compiled into ``out`` with grpcio-tools."""
    import google.rpc.status_pb2  # googleapis-common-protos: ships google/rpc/status.proto beside it

    includes = Path(google.rpc.status_pb2.__file__).parents[2]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}", f"-I{includes}",
                    f"--python_out={out}", f"--grpc_python_out={out}", "inference.proto"], check=True)
    # inference_pb2_grpc does ``import inference_pb2``: each is registered under its own name.
    return _load("inference_pb2", out), _load("inference_pb2_grpc", out)


def _load(name: str, directory: Path) -> ModuleType:
    """The module ``name`` from ``directory/name.py``, imported as ``name`` (once per process, as
    ``import`` would: protobuf allows each .proto to be registered only once)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, directory / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
