"""Which numeric precision the model runs in, and how close a precision stays to fp32.

``handler.precision: auto`` (the default) runs the model in bf16 on a CPU whose matrix units
do bf16 (AMX or AVX512-BF16), in fp32 elsewhere (on a GPU too, until it is measured there).
``int8`` runs a program quantized at archive time (``handler.model.quantize``). Archive builders
refuse a precision whose answers stray from fp32's: ``GATES`` and ``check_gate``.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
import torch
from torch import nn

log = logging.getLogger(__name__)

# CPU features whose bf16 matrix math beats fp32 (AMX tiles, or AVX512's bf16 dot products).
BF16_CPU_FEATURES = ("amx_bf16", "avx512_bf16")
# "0" turns bf16 detection off (the CPU is then treated as having none), "1" on; unset: detect.
BF16_ENV = "HANDLER_CPU_BF16"

# The least top-1 agreement with fp32 a precision must keep on the gate's images.
GATES = {"bf16": 0.99, "int8": 0.98}


def cpu_bf16_feature() -> str | None:
    """The CPU feature that makes bf16 fast here (``amx_bf16`` or ``avx512_bf16``), or None.
    ``$HANDLER_CPU_BF16=0`` says None whatever the CPU has (``1``: ``forced``)."""
    forced = os.environ.get(BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return "forced" if forced == "1" else None
    flags = _cpu_flags()
    return next((feature for feature in BF16_CPU_FEATURES if feature in flags), None)


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: Linux's /proc/cpuinfo, else what torch's own checks report."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    checks = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    return frozenset(flag for flag, name in checks.items() if getattr(torch.cpu, name, lambda: False)())


def resolve_precision(setting: str, device: torch.device, *, has_int8_program: bool) -> tuple[str, str]:
    """The precision the model runs in (``fp32``, ``fp16``, ``bf16`` or ``int8``) and why.

    ``auto``: bf16 on a CPU with bf16 matrix units, else fp32. A precision that cannot run here
    (fp16 or int8 on a CPU or GPU that lacks what it needs) is fp32, and the reason says so;
    the caller logs it as an error when it was asked for explicitly."""
    if setting == "auto":
        if device.type != "cpu":
            return "fp32", f"handler.precision is auto and the model is on {device.type} (bf16 there is not measured)"
        feature = cpu_bf16_feature()
        if feature is None:
            return "fp32", f"handler.precision is auto and this CPU has no bf16 matrix units (or {BF16_ENV}=0)"
        return "bf16", f"handler.precision is auto and this CPU has {feature}"
    if setting == "fp16" and device.type != "cuda":
        return "fp32", f"handler.precision fp16 needs CUDA; the model is on {device.type}"
    if setting == "int8":
        if device.type != "cpu":
            return "fp32", f"handler.precision int8 runs on the CPU only; the model is on {device.type}"
        if not has_int8_program:
            return "fp32", ("handler.precision is int8 but the model has no calibrated int8 program "
                            "(build the archive with scripts/build_mar.py --calibrate DIR)")
    if setting == "bf16" and device.type == "cpu" and cpu_bf16_feature() is None:
        return "bf16", "handler.precision is bf16 (this CPU has no bf16 matrix units: expect it slower than fp32)"
    return setting, f"handler.precision is {setting}"


@dataclass(frozen=True)
class Agreement:
    """How close one precision's outputs stay to fp32's on the same inputs."""

    images: int
    top1_agreement: float
    max_prob_diff: float


def agreement(reference_logits: torch.Tensor, logits: torch.Tensor) -> Agreement:
    """Top-1 agreement and the largest probability difference of ``logits`` against fp32's."""
    if reference_logits.shape != logits.shape or not len(logits):
        raise ValueError(f"need two non-empty outputs of one shape, got {tuple(reference_logits.shape)} "
                         f"and {tuple(logits.shape)}")
    ref, got = reference_logits.float(), logits.float()
    same = (ref.argmax(1) == got.argmax(1)).float().mean()
    diff = (ref.softmax(1) - got.softmax(1)).abs().max()
    return Agreement(len(logits), float(same), float(diff))


class GateFailed(ValueError):
    """A precision's answers strayed from fp32's more than its gate allows."""


def check_gate(precision: str, result: Agreement) -> None:
    """Raise GateFailed, naming the figures, when ``result`` is below ``precision``'s gate."""
    gate = GATES.get(precision)
    if gate is not None and result.top1_agreement < gate:
        raise GateFailed(
            f"{precision} agrees with fp32 on {result.top1_agreement:.1%} of top-1 answers "
            f"({result.images} images; max probability difference {result.max_prob_diff:.3f}); "
            f"the gate is {gate:.0%}")


@torch.inference_mode()
def run_in(model: nn.Module, inputs: torch.Tensor, precision: str, batch_size: int = 32) -> torch.Tensor:
    """``model``'s fp32 logits for ``inputs``, run eagerly in ``precision`` as the CPU pipeline
    runs it (bf16: ``Bf16Model``; fp32 and int8: as the model is), ``batch_size`` images at a time."""
    if precision == "bf16":
        model = Bf16Model(model)
    return torch.cat([model(chunk).float() for chunk in inputs.split(batch_size)])


class Bf16Model(nn.Module):
    """A copy of a model with its weights in bf16, fp32 in and out. Its last Linear layer (the
    classifier head) stays fp32, so the logits are not rounded to bf16's 8 bits. Compiled, it
    runs efficientnet_lite0 faster than autocast does and the others as fast
    (benchmarks/bench_precision.py, docs/results/bench_precision.json)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        import copy

        self.model = copy.deepcopy(model).to(torch.bfloat16)
        # "Last" in registration order: the head, in the classifiers torchvision and timm build.
        # If it is not the last layer run, the model fails on a dtype mismatch at warm-up, and
        # the pipeline serves fp32.
        heads = [name for name, module in self.model.named_modules() if isinstance(module, nn.Linear)]
        if not heads:  # a conv head, or TorchScript / export modules, whose layers are not nn.Linear
            log.warning("bf16: no nn.Linear classifier head found; the logits are computed in bf16 too")
        if heads:
            parent_name, _, attr = heads[-1].rpartition(".")
            parent = self.model.get_submodule(parent_name)
            setattr(parent, attr, _Float32Head(getattr(parent, attr).float()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.bfloat16)).float()


class _Float32Head(nn.Module):
    """A Linear layer run in fp32 on whatever comes in."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.float())
