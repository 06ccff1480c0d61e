"""Inference-only rewrites of a loaded model: BatchNorm folding and optional torch.compile."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# Folding reorders float arithmetic; outputs may move by rounding, never by more than this
# (relative to the largest output magnitude) or the folded model is not used.
FOLD_TOLERANCE = 1e-3


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``model`` with every Conv -> BatchNorm pair folded into one Conv (eval mode only).

    The same function with one pass over memory less per layer: on a 2-core CPU this took
    mobilenet_v3_small from about 95 to 52 ms per 32 images. The result is checked against the
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


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """``torch.compile`` for fixed shapes: the handler only ever runs the batch buckets, each
    compiled once during warm-up."""
    return torch.compile(model, mode=mode, dynamic=False)  # type: ignore[return-value]
