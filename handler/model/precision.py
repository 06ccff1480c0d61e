"""Which numeric precision the model runs in, and how close a precision stays to fp32.

``handler.precision: auto`` (the default) runs OpenVINO's int8 model where the model has one, the
CPU has int8 dot products (VNNI or AMX) and the gate record passed it; else bf16 on a CPU where the runtime's
bf16 is faster than fp32 (AMX: ``bf16_is_fast``) and the model's gate record says bf16 passed on
labelled images for these very weights (``handler.model.records``, ``handler.evaluate``); fp32
elsewhere (on a GPU too, until it is measured there). ``int8`` runs a program quantized at
archive time (``handler.model.quantize``), trusted only with a record of the same weights.
``agreement`` and ``run_in`` compare a precision's outputs with fp32's (benchmarks).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
import torch
from torch import nn

from handler.model.records import GATE_RECORD, GateRecord

log = logging.getLogger(__name__)

# CPU features whose bf16 matrix math beats fp32 (AMX tiles, or AVX512's bf16 dot products).
BF16_CPU_FEATURES = ("amx_bf16", "avx512_bf16")
# "0" turns bf16 detection off (the CPU is then treated as having none), "1" on; unset: detect.
BF16_ENV = "HANDLER_CPU_BF16"


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


# CPU features with int8 dot products (VNNI, or AMX's int8 tiles): what makes int8 pay.
INT8_CPU_FEATURES = ("amx_int8", "avx512_vnni", "avx_vnni")


def cpu_int8_feature() -> str | None:
    """The CPU feature that makes int8 fast here, or None."""
    flags = _cpu_flags()
    return next((feature for feature in INT8_CPU_FEATURES if feature in flags), None)


def bf16_is_fast() -> str | None:
    """The CPU feature that makes bf16 beat fp32 here (AMX), or None. With AVX512-BF16 alone bf16
    ran no faster than fp32 on either runtime, and slower for resnet50 (docs/precision.md,
    benchmarks/bench_runtime.py). ``$HANDLER_CPU_BF16`` forces either way."""
    feature = cpu_bf16_feature()
    return None if feature == "avx512_bf16" else feature


def resolve_precision(setting: str, device: torch.device, *, has_int8_program: bool, runtime: str = "torch",
                      record: GateRecord | None = None, weights_hash: str | None = None,
                      int8_sha256: str | None = None) -> tuple[str, str]:
    """The precision the model runs in (``fp32``, ``fp16``, ``bf16`` or ``int8``) and why.

    ``auto`` on a CPU: OpenVINO's int8 where the CPU has int8 dot products, else bf16 where it has
    AMX, each only when ``record`` (the gate record) is for these weights (``weights_hash``) and
    passed it on ``runtime`` (int8: that very int8 model, ``int8_sha256``); else fp32, and the
    reason says how to gate. A record for other weights (stale) is refused for every reduced
    precision; an explicit bf16 that the record failed on this runtime is refused; int8 needs its
    model and a record that measured it. A precision that cannot run here (fp16 or int8 on a CPU
    or GPU that lacks what it needs) is fp32, and the reason says so; the caller logs it as an
    error when it was asked for explicitly."""
    stale = None
    if record is not None and weights_hash is not None and record.weights_sha256 != weights_hash:
        stale = (f"its {GATE_RECORD} was measured on other weights (sha256 {record.weights_sha256[:12]}..., these "
                 f"are {weights_hash[:12]}...): gate them again (build_mar.py --eval DIR)")
    if setting == "auto":
        return _resolve_auto(device, runtime, record, stale, has_int8_program, int8_sha256)
    if setting == "fp16" and device.type != "cuda":
        return "fp32", f"handler.precision fp16 needs CUDA; the model is on {device.type}"
    if setting in ("bf16", "int8") and stale:
        return "fp32", f"handler.precision is {setting} but {stale}"
    failed = record.failed("bf16", runtime) if setting == "bf16" and record is not None else None
    if failed is not None and record is not None:
        return "fp32", f"handler.precision is bf16 but the gate record refuses it ({failed.summary(record.images, record.fp32_top1)})"
    if setting == "int8":
        if device.type != "cpu":
            return "fp32", f"handler.precision int8 runs on the CPU only; the model is on {device.type}"
        if not has_int8_program:
            return "fp32", ("handler.precision is int8 but the model has no calibrated int8 program "
                            "(build the archive with scripts/build_mar.py --precision int8 --calibrate DIR)")
        if record is None or weights_hash is None or record.passed("int8", runtime, int8_sha256) is None:
            return "fp32", ("handler.precision is int8 but no gate record of these weights vouches for this int8 "
                            "program (a program the gate did not measure may be stale): build it again with "
                            "build_mar.py --precision int8 --calibrate DIR --eval DIR")
    if setting == "bf16" and device.type == "cpu" and bf16_is_fast() is None:
        return "bf16", "handler.precision is bf16 (bf16 is not faster than fp32 on this CPU: no AMX)"
    return setting, f"handler.precision is {setting}"


def _resolve_auto(device: torch.device, runtime: str, record: GateRecord | None, stale: str | None,
                  has_int8_program: bool, int8_sha256: str | None) -> tuple[str, str]:
    """``precision: auto`` (see resolve_precision)."""
    if device.type != "cpu":
        return "fp32", f"handler.precision is auto and the model is on {device.type} (bf16 there is not measured)"
    if stale:
        return "fp32", f"handler.precision is auto but {stale}"
    if record is None:
        return "fp32", ("handler.precision is auto and no gate record is there for these weights: measure a reduced "
                        "precision on labelled images (build_mar.py --eval DIR, scripts/gate.py) to run it")
    int8, not_int8 = cpu_int8_feature(), ""
    if runtime == "openvino" and has_int8_program:
        passed_int8 = record.passed("int8", runtime, int8_sha256)
        if int8 and passed_int8 is not None:
            return "int8", (f"handler.precision is auto, this CPU has {int8}, the model has OpenVINO's int8 and the "
                            f"gate passed ({passed_int8.summary(record.images, record.fp32_top1)})")
        not_int8 = ("; not int8: this CPU has no int8 dot products (VNNI, AMX)" if not int8 else
                    "; not int8: the gate record did not pass this int8 model")
    feature = bf16_is_fast()
    if feature is None:
        return "fp32", (f"handler.precision is auto and bf16 is not faster than fp32 on this CPU (no AMX, "
                        f"or {BF16_ENV}=0){not_int8}")
    passed = record.passed("bf16", runtime)
    if passed is None:
        gated = record.failed("bf16", runtime)
        why = gated.summary(record.images, record.fp32_top1) if gated else f"bf16 on {runtime} was not gated"
        return "fp32", f"handler.precision is auto and the gate record refuses bf16 ({why}){not_int8}"
    return "bf16", (f"handler.precision is auto, this CPU has {feature} and the gate passed "
                    f"({passed.summary(record.images, record.fp32_top1)}){not_int8}")


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
