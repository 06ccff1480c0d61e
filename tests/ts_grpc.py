"""TorchServe's own gRPC client, as its users build it: stubs generated from its inference.proto."""

from __future__ import annotations

import importlib
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
    sys.path.insert(0, str(out))
    return importlib.import_module("inference_pb2"), importlib.import_module("inference_pb2_grpc")
