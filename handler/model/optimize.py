"""Inference-only rewrites of a loaded model: BatchNorm folding and torch.compile."""

from __future__ import annotations

import functools
import logging
import subprocess
from pathlib import Path

import torch
from torch import nn

from handler.config import HandlerConfig
from handler.model.loading import load_model
from handler.model.zoo import ZooFiles

log = logging.getLogger(__name__)

# Folding reorders float arithmetic; outputs may move by rounding, never by more than this
# (relative to the largest output magnitude) or the folded model is not used.
FOLD_TOLERANCE = 1e-3


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``model`` with every Conv -> BatchNorm pair folded into one Conv (eval mode only).

    The same function with one pass over memory less per layer. The result is checked against the
    original on ``example``; a model that cannot be traced, or whose outputs would drift, is
    returned unchanged.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    try:
        folded = fuse(model)  # traces a deep copy; the original stays intact
        with torch.inference_mode():
            want, got = model(example), folded(example)
    except Exception as exc:  # untraceable control flow, custom modules, ...
        log.info("BatchNorm folding skipped: %s: %s", type(exc).__name__, str(exc)[:200])
        return model
    drift = float((got - want).abs().max()) / max(1.0, float(want.abs().max()))
    if not drift <= FOLD_TOLERANCE:
        log.warning("BatchNorm folding skipped: outputs moved by %.2g (relative)", drift)
        return model
    return folded


def prepare_for_inference(config: HandlerConfig, weights: Path | bytes | ZooFiles, num_classes: int,
                          device: torch.device = torch.device("cpu")) -> nn.Module:
    """The fp32 model as the handler serves it, before compiling: loaded, BatchNorm folded (as
    ``config.fuse_batchnorm`` says), on ``device``, channels_last."""
    model = load_model(config.arch, weights, num_classes)
    if config.fuse_batchnorm:
        size = config.image_size
        model = fold_batchnorm(model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)))
    return model.to(device).to(memory_format=torch.channels_last)


def compile_model(model: nn.Module, mode: str, *, freeze: bool = False) -> nn.Module:
    """``torch.compile`` for fixed shapes: the handler only ever runs the batch buckets, each
    compiled once during warm-up. ``freeze``: inductor's freezing (the weights become constants
    of the graph, packed once; inference only). Compiled code is cached on disk by torch
    (inductor's FX graph and AOTAutograd caches, in ``$TORCHINDUCTOR_CACHE_DIR``, by default
    ``/tmp/torchinductor_<user>``): a restart on the same machine compiles from the cache."""
    compiled: nn.Module = torch.compile(model, mode=mode, dynamic=False)  # type: ignore[assignment]
    return _Frozen(compiled) if freeze else compiled


class _Frozen(nn.Module):
    """Runs a compiled model with inductor's freezing on, so that compiling (lazily, on a
    shape's first call) freezes. It must be inductor's config while compiling: passed through
    ``torch.compile(options=...)`` instead, freezing fails on int8 programs (inductor cannot
    constant-fold oneDNN's weight prepacking then). The patch is process-wide while it lasts:
    classifiers compiling in several threads of one process at once could see each other's
    setting (each door runs one model per process)."""

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch._inductor import config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(x)


def should_compile(setting: bool | str, device: torch.device, arch: str) -> tuple[bool, str]:
    """Whether to compile, and why: ``auto`` compiles on the CPU when inductor's C++ compiler
    works here (on a GPU the eager model stays the default until it is measured there)."""
    if setting is True or setting is False:
        return setting, "handler.compile is " + ("true" if setting else "false")
    if device.type != "cpu":
        return False, f"handler.compile is auto and the model is on {device.type}"
    if arch == "torchscript":
        return False, "handler.compile is auto and a TorchScript model runs in its own JIT"
    problem = cpp_compiler_problem()
    if problem is not None:
        return False, f"handler.compile is auto but {problem}"
    return True, "handler.compile is auto and a C++ compiler works here"


@functools.lru_cache(maxsize=1)
def cpp_compiler_problem() -> str | None:
    """None when the C++ compiler inductor would use (``$CXX``, else g++) compiles a line of C++;
    otherwise what is wrong."""
    from torch._inductor import cpp_builder

    try:
        compiler = cpp_builder.get_cpp_compiler()
    except Exception as exc:  # InvalidCxxCompiler: none found
        return f"no working C++ compiler was found ({str(exc)[:160]})"
    try:
        subprocess.run([compiler, "-x", "c++", "-fsyntax-only", "-"], input=b"int main() { return 0; }\n",
                       capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the C++ compiler {compiler!r} does not work ({str(exc)[:160]})"
    return None
