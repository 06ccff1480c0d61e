"""The model on its device: loaded, prepared, compiled, in a precision that works here, and its
forward pass.

    ModelRunner(...)   resolves the runtime (torch or OpenVINO, ``handler.model.ov_runtime``) and
                       the precision (``handler.model.precision``, with the model's gate record),
                       loads and prepares the model (BatchNorm folded, channels_last; bf16
                       weights on a CPU; the int8 program; or the OpenVINO model), on the device;
                       says in the log what it chose and why
    warm_up(normalize) compiles each batch bucket (``handler.model.optimize``) and runs it once; a
                       bf16 or int8 model that fails or overflows here serves fp32 instead
    forward(x)         the model on a normalized batch, padded to its bucket
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch

from handler.config import HandlerConfig
from handler.devices import autocast_dtype
from handler.model.optimize import compile_model, prepare_for_inference, should_compile
from handler.model.ov_runtime import OpenVinoModel, load_openvino, read_int8, resolve_runtime
from handler.model.precision import Bf16Model, resolve_precision
from handler.model.quantize import load_int8_program
from handler.model.records import ModelArtifacts, weights_sha256
from handler.model.zoo import ZooFiles

log = logging.getLogger(__name__)

# uint8 pixels -> the model's normalized input on its device (the decode path's normalizer).
Normalize = Callable[[torch.Tensor], torch.Tensor]


class ModelRunner:
    """One model, prepared for inference on ``device``.

    Attributes:
        precision: what the model runs in (``fp32``, ``fp16``, ``bf16``, ``int8``): the
            configured precision where it works here, else fp32 (the log says why).
        runtime: what runs it (``torch`` or ``openvino``).
        weights_hash: the weights' SHA-256, which the gate record must name.
        model: the eager model.
        compiled: the compiled model, once ``warm_up`` compiled it; ``compiled_buckets`` the
            batch sizes it was compiled for (other sizes run the eager model).
        autocast_dtype: the dtype a GPU autocasts to (fp16/bf16), else None.
    """

    def __init__(self, config: HandlerConfig, weights: Path | bytes | ZooFiles, num_classes: int,
                 device: torch.device, artifacts: ModelArtifacts = ModelArtifacts()) -> None:
        self.config, self.device = config, device
        self._weights, self._num_classes, self._artifacts = weights, num_classes, artifacts
        self._pinned_fp32 = False
        self.weights_hash = weights_sha256(weights)
        self.runtime, reason = resolve_runtime(config.runtime, device, config.precision,
                                               openvino_int8=artifacts.openvino_int8 is not None,
                                               torch_int8=artifacts.int8_program is not None)
        honoured = self.runtime == config.runtime or config.runtime == "auto"
        (log.info if honoured else log.error)("runtime %s (%s)", self.runtime, reason)
        self._resolve_precision()
        self.compiled: torch.nn.Module | None = None
        self.compiled_buckets: tuple[int, ...] = ()
        self.model = self._prepare_model()
        self.autocast_dtype: torch.dtype | None = None
        self._set_up_device()

    def _resolve_precision(self) -> None:
        """Choose the precision for this runtime (again after a runtime fallback), and log why."""
        setting = self.config.precision
        if self._pinned_fp32:  # a reduced precision failed here: fp32 on whatever runtime serves
            self.precision = "fp32"
            return
        int8 = self._artifacts.int8_sha256(self.runtime)
        self.precision, reason = resolve_precision(setting, self.device, has_int8_program=int8 is not None,
                                                   runtime=self.runtime, record=self._artifacts.gate_record,
                                                   weights_hash=self.weights_hash, int8_sha256=int8)
        honoured = self.precision == setting or setting == "auto"
        (log.info if honoured else log.error)("precision %s (%s)", self.precision, reason)

    def _set_up_device(self) -> None:
        """A GPU autocasts (on the CPU a bf16 model has bf16 weights, ``Bf16Model``, instead);
        cuDNN autotunes only when asked (fixed batch buckets)."""
        if self.device.type == "cuda":
            self.autocast_dtype = autocast_dtype(self.precision, self.device)
            torch.backends.cudnn.benchmark = self.config.cudnn_benchmark

    def _prepare_model(self) -> torch.nn.Module:
        """Load, fold BatchNorm, move to the device in channels_last (eager; see _compile); bf16
        on the CPU: its weights converted (``Bf16Model``); int8: the calibrated program (its
        BatchNorm is folded already)."""
        cfg = self.config
        if self.runtime == "openvino":
            try:
                return self._openvino_model()
            except Exception as exc:
                why = f"{type(exc).__name__}: {str(exc)[:300]}"
            if self.precision != "fp32":  # bf16 or int8 OpenVINO cannot run here: its fp32, then torch
                self._log_fallback(why)
                self.precision, self._pinned_fp32 = "fp32", True
                try:
                    return self._openvino_model()
                except Exception as exc:
                    why = f"{type(exc).__name__}: {str(exc)[:300]}"
            log.error("OpenVINO cannot run this model (%s); running it on torch", why)
            self.runtime = "torch"
            self._resolve_precision()
        if self.precision == "int8":
            assert self._artifacts.int8_program is not None
            compiled, reason = should_compile(cfg.compile, self.device, cfg.arch)
            if not compiled:  # eagerly, the int8 program is a slow reference: not worth loading
                self._log_fallback(f"int8 runs compiled only, and torch.compile is off ({reason})")
                self.precision, self._pinned_fp32 = "fp32", True
            else:
                try:
                    return load_int8_program(self._artifacts.int8_program)
                except Exception as exc:
                    self._log_fallback(f"the int8 program does not load: {type(exc).__name__}: {str(exc)[:300]}")
                    self.precision, self._pinned_fp32 = "fp32", True
        model = prepare_for_inference(cfg, self._weights, self._num_classes, self.device)
        if self.precision == "bf16" and self.device.type == "cpu":
            try:
                return Bf16Model(model)
            except Exception as exc:
                self._log_fallback(f"its weights do not convert: {type(exc).__name__}: {str(exc)[:300]}")
                self.precision, self._pinned_fp32 = "fp32", True
        return model

    def _openvino_model(self) -> torch.nn.Module:
        """The model converted by OpenVINO (or read from its cache) and compiled in this precision."""
        started = time.perf_counter()
        if self.precision == "int8":
            assert self._artifacts.openvino_int8 is not None
            converted, source = read_int8(self._artifacts.openvino_int8), "int8 (NNCF, made at archive time) read"
        else:
            converted, source = load_openvino(self.config, self._weights, self._num_classes, self.weights_hash)
        model = OpenVinoModel(converted, self.precision, torch.get_num_threads())
        log.info("OpenVINO model %s, compiled for %s with %d threads in %.1f s", source, self.precision,
                 torch.get_num_threads(), time.perf_counter() - started)
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model on ``x``, in the configured precision: padded to the smallest compiled bucket
        that fits and run compiled, or padded to a ``batch_buckets`` size (fixed shapes for
        cuDNN) and run eager; sizes above every bucket run eager as they are. The result is the
        caller's to keep: a compiled model's output is copied, since with CUDA graphs it is a view
        of the graph's output buffer, which the next batch overwrites."""
        count = x.shape[0]
        buckets = self.compiled_buckets or self.config.batch_buckets
        bucket = next((b for b in buckets if b >= count), count)
        compiled = self.compiled is not None and bucket in self.compiled_buckets
        model = self.compiled if compiled else self.model
        assert model is not None
        if bucket > count:
            x = torch.cat([x, x.new_zeros((bucket - count, *x.shape[1:]))]).contiguous(
                memory_format=torch.channels_last
            )
        if self.autocast_dtype is None:
            out = model(x)[:count]
        else:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                out = model(x)[:count].float()
        return out.clone() if compiled else out

    # ---- warm-up ----------------------------------------------------------------------------

    def warm_up(self, normalize: Normalize) -> None:
        """Compile (as configured), then run each batch bucket once, so that compilation, cuDNN
        tuning and lazy initialization happen here, not in the first requests. A model that
        fails in bf16 or int8 (an error, or outputs that are not finite) serves fp32 instead.
        ``normalize`` makes model input of uint8 pixels (the decode path's)."""
        try:
            self._warm_model(normalize)
            return
        except Exception as exc:
            if self.precision == "fp32" and self.runtime == "torch":
                raise
            why = f"{type(exc).__name__}: {str(exc)[:300]}"
        if self.precision != "fp32":
            self._fall_back_to_fp32(why)
            try:
                self._warm_model(normalize)
                return
            except Exception as exc:
                if self.runtime == "torch":
                    raise
                why = f"{type(exc).__name__}: {str(exc)[:300]}"
        # OpenVINO fails even in fp32: torch serves it.
        log.error("OpenVINO cannot run this model (%s); running it on torch", why)
        self.runtime, self.compiled, self.compiled_buckets = "torch", None, ()
        self._resolve_precision()
        self.model = self._prepare_model()
        self._warm_model(normalize)

    def _warm_model(self, normalize: Normalize) -> None:
        self._compile(normalize)  # runs each bucket it compiles
        self._run_buckets(tuple(b for b in self.config.batch_buckets if b not in self.compiled_buckets), normalize)
        if self.precision != "fp32":
            self._check_outputs(normalize)

    @torch.inference_mode()
    def _check_outputs(self, normalize: Normalize) -> None:
        """Raise if the model's outputs on a few random images are not finite (a reduced
        precision that overflows)."""
        size = self.config.image_size
        bucket = (self.compiled_buckets or self.config.batch_buckets or (2,))[0]
        pixels = torch.randint(0, 256, (bucket, 3, size, size), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        if not bool(torch.isfinite(self.forward(normalize(pixels))).all()):
            raise FloatingPointError(f"{self.precision} outputs are not finite")

    def _log_fallback(self, why: str) -> None:
        log.error("precision %s does not work for this model (%s); running fp32", self.precision, why)

    def _fall_back_to_fp32(self, why: str) -> None:
        """Serve the fp32 model instead of the chosen precision's, saying why in the log."""
        self._log_fallback(why)
        self.precision, self.autocast_dtype, self._pinned_fp32 = "fp32", None, True
        self.compiled, self.compiled_buckets = None, ()
        self.model = self._prepare_model()

    @torch.inference_mode()
    def _compile(self, normalize: Normalize) -> None:
        """torch.compile the model for each of ``compile_buckets``, largest first; once
        ``compile_budget_s`` is spent no further bucket starts. One log line says what was
        decided. A failed compile serves the eager model in fp32; in bf16 or int8 it raises, and
        warm_up falls back to fp32."""
        cfg = self.config
        if self.runtime == "openvino":
            # OpenVINO compiled the model when it was loaded; its dynamic batch dimension takes
            # every size: the buckets are run once, so that their kernels are ready.
            started = time.perf_counter()
            self._run_buckets(cfg.batch_buckets or cfg.compile_buckets, normalize)
            log.info("torch.compile not used (OpenVINO runs the model): batch sizes %s warmed in %.1f s",
                     list(cfg.batch_buckets or cfg.compile_buckets), time.perf_counter() - started)
            return
        wanted, reason = should_compile(cfg.compile, self.device, cfg.arch)
        if not wanted:
            log.info("torch.compile off (%s): serving the eager model", reason)
            return
        # Freezing folds the weights into the compiled graph as constants: inductor then packs
        # them for oneDNN once, in bf16, and fuses int8's quantize/dequantize into its kernels.
        freeze = self.device.type == "cpu" and self.precision in ("bf16", "int8")
        self.compiled = compile_model(self.model, cfg.compile_mode, freeze=freeze)
        started = time.perf_counter()
        for bucket in sorted(cfg.compile_buckets, reverse=True):
            # The largest bucket (full batches: the throughput) is always compiled.
            if self.compiled_buckets and time.perf_counter() - started > cfg.compile_budget_s:
                break
            self.compiled_buckets = tuple(sorted({*self.compiled_buckets, bucket}))
            try:
                self._run_buckets((bucket,), normalize)  # forward() runs the compiled model for a compiled bucket
            except Exception as exc:
                if self.precision != "fp32":
                    raise  # warm_up falls back to fp32
                log.error("torch.compile failed (%s: %s); serving the eager model", type(exc).__name__,
                          str(exc)[:300])
                self.compiled, self.compiled_buckets = None, ()
                return
        skipped = sorted(set(cfg.compile_buckets) - set(self.compiled_buckets))
        log.info("torch.compile on (%s)%s: batch sizes %s compiled in %.1f s%s", reason,
                 " with freezing" if freeze else "", list(self.compiled_buckets), time.perf_counter() - started,
                 f"; budget of {cfg.compile_budget_s:g} s spent: batch sizes {skipped} run eager" if skipped else "")

    @torch.inference_mode()
    def _run_buckets(self, buckets: tuple[int, ...], normalize: Normalize) -> None:
        size = self.config.image_size
        for bucket in buckets:
            self.forward(normalize(torch.zeros((bucket, 3, size, size), dtype=torch.uint8)))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
