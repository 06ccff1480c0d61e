"""Which device the model runs on, in which precision, with how many CPU threads."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

# Torch threads of a process whose model is on a GPU (host-side ops only: the rest is the GPU's).
GPU_HOST_THREADS = 2


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> the first GPU when CUDA is available, else the CPU; ``cpu``, ``cuda``,
    ``cuda:N`` as named (asking for CUDA where there is none is an error, not a silent CPU)."""
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be the CPU or a CUDA GPU; got {resolved}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {resolved} was asked for but CUDA is not available here; use 'auto' or 'cpu'")
        if resolved.index is None:
            resolved = torch.device("cuda", 0)
    return resolved


def select_device(gpu_id: Any) -> torch.device:
    """The GPU a model server assigned to this worker when CUDA is available, else the CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


def thread_budget(configured: int, backend_workers: Any, device: torch.device | None = None) -> int:
    """Intra-op threads for this process: as configured, or the cores shared among the backend
    workers (several workers each using every core would oversubscribe the machine). The loader
    workers run one thread each, and decoding and inference take turns, not overlap. With the
    model on a GPU the process's own CPU work is small: GPU_HOST_THREADS, and the cores are
    left to the loader workers."""
    if configured > 0:
        return configured
    workers = backend_workers if isinstance(backend_workers, int) and backend_workers > 0 else 1
    share = max(1, (os.cpu_count() or 1) // workers)
    return min(share, GPU_HOST_THREADS) if device is not None and device.type == "cuda" else share


def copied_event(device: torch.device) -> Any:
    """On CUDA, an event recorded on the current stream: it completes once the work enqueued so
    far (a copy out of a pinned buffer) is done, so the buffer may be reused then. None elsewhere
    (CPU copies are done when they return)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None runs as the model is (fp32, or
    int8's own program)."""
    if precision not in ("fp16", "bf16"):
        return None
    if precision == "fp16" and device.type != "cuda":
        log.warning("precision fp16 needs CUDA; running in fp32 on %s", device)
        return None
    return torch.float16 if precision == "fp16" else torch.bfloat16


def threads_for_cpus(num_cpus: float) -> int:
    """The torch threads of an actor granted ``num_cpus`` CPUs (a Ray Serve replica, a Ray Data
    actor): as many, at least one. Not the machine's cores: actors share nodes."""
    return max(1, math.floor(num_cpus))
