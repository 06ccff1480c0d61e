"""What a benchmark ran on, for its result file: the CPU model and the features that decide
precision and runtime, the core count, and the library versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# The CPU features the handler's choices depend on (handler.model.precision).
FEATURES = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")


def machine() -> dict[str, Any]:
    """The CPU model name, its relevant feature flags, cores, platform, torch and OpenVINO versions."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.partition(":")[2].strip()
            elif line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
    except OSError:
        pass
    info: dict[str, Any] = {"cpu_model": model, "cpu_features": [f for f in FEATURES if f in flags],
                            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        pass
    try:
        import openvino

        info["openvino"] = openvino.__version__
    except ImportError:
        pass
    return info
