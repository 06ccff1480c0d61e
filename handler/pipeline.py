"""The pipeline: loader items in, top-k predictions and failures by key out, in one call (``run``).

    decode     the persistent multi-worker DataLoader (and, with ``decode_device: cuda``,
               nvJPEG lists on the GPU), lazily: chunks as the workers finish them
    batches    chunks gathered into full batches on the device and normalized
               (``handler.assemble.DeviceBatches``)
    forward    the model (BatchNorm folded, channels_last, optional buckets / compile), in the
               precision ``handler.precision`` resolves to here (``handler.precision``)
    top-k      softmax and the k best labels per image, once the device is done
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from handler.assemble import DeviceBatches
from handler.config import HandlerConfig
from handler.dataset import DecodedBatch, ImageBytesDataset, LoaderItem
from handler.devices import autocast_dtype
from handler.errors import ImageError
from handler.gpu_decode import BatchedJpegDecoder
from handler.images import ImageTransform
from handler.loader import PersistentImageLoader
from handler.metrics import StageClock
from handler.normalize import Normalizer
from handler.optimize import compile_model, prepare_for_inference, should_compile
from handler.postprocess import top_k_labels
from handler.precision import Bf16Model, resolve_precision
from handler.quantize import load_int8_program
from handler.zoo import ZooFiles

log = logging.getLogger(__name__)

Prediction = dict[str, float]


@dataclass
class RunResult:
    """What ``Pipeline.run`` made of its items: each good image's prediction and each bad
    image's failure, by key (every key is in exactly one of them)."""

    predictions: dict[int, Prediction] = field(default_factory=dict)
    failures: dict[int, ImageError] = field(default_factory=dict)


class Pipeline:
    """Decodes, batches and infers; owns the loader workers and the model."""

    def __init__(self, config: HandlerConfig, labels: list[str], weights: Path | bytes | ZooFiles,
                 device: torch.device, int8_program: Path | bytes | None = None) -> None:
        self.config, self.labels, self.device = config, labels, device
        self._weights, self._int8_program = weights, int8_program
        self.precision, reason = resolve_precision(config.precision, device, has_int8_program=int8_program is not None)
        honoured = self.precision == config.precision or config.precision == "auto"
        (log.info if honoured else log.error)("precision %s (%s)", self.precision, reason)
        self.loader = PersistentImageLoader(
            ImageBytesDataset(ImageTransform(config)),
            batch_size=config.loader_chunk,
            num_workers=config.num_workers,
            image_size=config.image_size,
            pin_memory=config.pin_memory and device.type == "cuda",
            mp_context=config.mp_context,
            inline_max_images=config.inline_max_images,
            worker_nice=config.worker_nice if device.type == "cuda" else 0,
        )
        # Set by _compile (warm-up): the compiled model and the batch sizes it was compiled for;
        # other sizes run the eager model.
        self._compiled: torch.nn.Module | None = None
        self._compiled_buckets: tuple[int, ...] = ()
        try:
            # Fork the workers while this process is small and has no CUDA context.
            self.loader.start()
            self.model = self._prepare_model()
            self.jpeg_decoder = self._prepare_device()
            self.warm_up()
        except BaseException:
            self.loader.close()
            raise

    def _prepare_model(self) -> torch.nn.Module:
        """Load, fold BatchNorm, move to the device in channels_last (eager; see _compile); bf16
        on the CPU: its weights converted (``Bf16Model``); int8: the calibrated program (its
        BatchNorm is folded already)."""
        cfg = self.config
        if self.precision == "int8":
            assert self._int8_program is not None
            compiled, reason = should_compile(cfg.compile, self.device, cfg.arch)
            if not compiled:  # eagerly, the int8 program is a slow reference: not worth loading
                self._log_fallback(f"int8 runs compiled only, and torch.compile is off ({reason})")
                self.precision = "fp32"
            else:
                try:
                    return load_int8_program(self._int8_program)
                except Exception as exc:
                    self._log_fallback(f"the int8 program does not load: {type(exc).__name__}: {str(exc)[:300]}")
                    self.precision = "fp32"
        model = prepare_for_inference(cfg, self._weights, len(self.labels), self.device)
        if self.precision == "bf16" and self.device.type == "cpu":
            try:
                return Bf16Model(model)
            except Exception as exc:
                self._log_fallback(f"its weights do not convert: {type(exc).__name__}: {str(exc)[:300]}")
                self.precision = "fp32"
        return model

    def _prepare_device(self) -> BatchedJpegDecoder | None:
        """Normalization constants on the device; on CUDA the pinned pixel ring, cuDNN
        autotuning and the nvJPEG decoder."""
        cfg = self.config
        self._normalize = Normalizer(cfg.mean, cfg.std, self.device)
        # A GPU autocasts; on the CPU a bf16 model has bf16 weights (Bf16Model) instead.
        self._autocast_dtype = autocast_dtype(self.precision, self.device) if self.device.type == "cuda" else None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
            if cfg.pin_memory:
                self.loader.pin_ring()
        if cfg.decode_device != "cuda":
            return None
        if self.device.type != "cuda":
            log.warning("decode_device cuda needs the model on a GPU; decoding on the CPU")
            return None
        return BatchedJpegDecoder(cfg, self.device)

    # ---- decode ---------------------------------------------------------------------------

    def decode(self, items: list[LoaderItem]) -> Iterator[DecodedBatch]:
        """Decoded, resized uint8 batches of ``items``, yielded as they are ready, so the model
        can run on the first while the workers still decode the next. The first batches are
        dispatched to the workers at once."""
        if self.jpeg_decoder is None:
            return self.loader.iterate(items)
        return self._decode_on_device(items)

    def _decode_on_device(self, items: list[LoaderItem]) -> Iterator[DecodedBatch]:
        assert self.jpeg_decoder is not None
        jobs, rest = self.jpeg_decoder.split(items)
        # The CPU's share goes out first: the workers decode it while nvJPEG decodes the rest.
        on_gpu = len(jobs) - round(len(jobs) * self.config.cpu_decode_share)
        rest.extend(job.item for job in jobs[on_gpu:])
        cpu_batches = self.loader.iterate(sorted(rest, key=lambda item: item.key)) if rest else iter(())
        rejected: list[LoaderItem] = []
        size = self.config.batch_size
        chunks = [jobs[start : min(start + size, on_gpu)] for start in range(0, on_gpu, size)]
        for chunk, batch in zip(chunks, self.jpeg_decoder.decode_lists(chunks, ahead=self.config.decode_ahead)):
            if batch is None:
                rejected.extend(job.item for job in chunk)
            else:
                yield batch
        yield from cpu_batches
        if rejected:  # lists nvJPEG refused: the workers decode them and report per image
            yield from self.loader.iterate(rejected)

    # ---- run ------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, items: list[LoaderItem], clock: StageClock | None = None) -> RunResult:
        """Every item's top-k prediction or failure, by key. Decoding starts at once; each model
        batch runs as soon as it is complete, while the workers decode the next; the device is
        waited for once, at the end. Stage times go to ``clock``."""
        clock = clock if clock is not None else StageClock(self.device)
        batches = DeviceBatches(self.decode(items), size=self.config.batch_size, device=self.device,
                                normalize=self._normalize, clock=clock)
        outputs: list[tuple[list[int], torch.Tensor]] = []
        for keys, inputs in batches:
            with clock.device("InferenceMs"):
                outputs.append((keys, self.forward(inputs)))
        clock.resolve()  # the device is done: what follows is postprocessing's own time
        result = RunResult(failures=batches.failures)
        with clock.host("PostprocessMs"):
            for keys, logits in outputs:
                result.predictions.update(zip(keys, top_k_labels(logits, self.labels, self.config.top_k)))
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model on ``x``, in the configured precision: padded to the smallest compiled bucket
        that fits and run compiled, or padded to a ``batch_buckets`` size (fixed shapes for
        cuDNN) and run eager; sizes above every bucket run eager as they are. The result is the
        caller's to keep: a compiled model's output is copied, since with CUDA graphs it is a view
        of the graph's output buffer, which the next batch overwrites."""
        count = x.shape[0]
        buckets = self._compiled_buckets or self.config.batch_buckets
        bucket = next((b for b in buckets if b >= count), count)
        compiled = self._compiled is not None and bucket in self._compiled_buckets
        model = self._compiled if compiled else self.model
        assert model is not None
        if bucket > count:
            x = torch.cat([x, x.new_zeros((bucket - count, *x.shape[1:]))]).contiguous(
                memory_format=torch.channels_last
            )
        if self._autocast_dtype is None:
            out = model(x)[:count]
        else:
            with torch.autocast(self.device.type, dtype=self._autocast_dtype):
                out = model(x)[:count].float()
        return out.clone() if compiled else out

    def to_model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW (pinned on CUDA) -> normalized float on the device, channels_last."""
        return self._normalize(pixels)

    # ---- start-up and shutdown ------------------------------------------------------------

    def warm_up(self) -> None:
        """Compile (as configured), then run each batch bucket once (and nvJPEG), so cuDNN tuning,
        compilation and lazy initialization happen here, not in the first requests. A model that
        fails in bf16 or int8 (an error, or outputs that are not finite) serves fp32 instead."""
        if self.jpeg_decoder is not None and not self.jpeg_decoder.warm_up():  # nvJPEG sets up on first use
            log.warning("batched GPU JPEG decode does not work here; decoding every image on the CPU")
            self.jpeg_decoder = None
        try:
            self._warm_model()
        except Exception as exc:
            if self.precision == "fp32":
                raise
            self._fall_back_to_fp32(f"{type(exc).__name__}: {str(exc)[:300]}")
            self._warm_model()

    def _warm_model(self) -> None:
        self._compile()  # runs each bucket it compiles
        self._run_buckets(tuple(b for b in self.config.batch_buckets if b not in self._compiled_buckets))
        if self.precision != "fp32":
            self._check_outputs()

    @torch.inference_mode()
    def _check_outputs(self) -> None:
        """Raise if the model's outputs on a few random images are not finite (a reduced
        precision that overflows)."""
        size = self.config.image_size
        bucket = (self._compiled_buckets or self.config.batch_buckets or (2,))[0]
        pixels = torch.randint(0, 256, (bucket, 3, size, size), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        if not bool(torch.isfinite(self.forward(self.to_model_input(pixels))).all()):
            raise FloatingPointError(f"{self.precision} outputs are not finite")

    def _log_fallback(self, why: str) -> None:
        log.error("precision %s does not work for this model (%s); running fp32", self.precision, why)

    def _fall_back_to_fp32(self, why: str) -> None:
        """Serve the fp32 model instead of the chosen precision's, saying why in the log."""
        self._log_fallback(why)
        self.precision, self._autocast_dtype = "fp32", None
        self._compiled, self._compiled_buckets = None, ()
        self.model = self._prepare_model()

    @torch.inference_mode()
    def _compile(self) -> None:
        """torch.compile the model for each of ``compile_buckets``, largest first; once
        ``compile_budget_s`` is spent no further bucket starts. One log line says what was
        decided. A failed compile serves the eager model in fp32; in bf16 or int8 it raises, and
        warm_up falls back to fp32."""
        cfg = self.config
        wanted, reason = should_compile(cfg.compile, self.device, cfg.arch)
        if not wanted:
            log.info("torch.compile off (%s): serving the eager model", reason)
            return
        # Freezing folds the weights into the compiled graph as constants: inductor then packs
        # them for oneDNN once, in bf16, and fuses int8's quantize/dequantize into its kernels.
        freeze = self.device.type == "cpu" and self.precision in ("bf16", "int8")
        self._compiled = compile_model(self.model, cfg.compile_mode, freeze=freeze)
        started = time.perf_counter()
        for bucket in sorted(cfg.compile_buckets, reverse=True):
            # The largest bucket (full batches: the throughput) is always compiled.
            if self._compiled_buckets and time.perf_counter() - started > cfg.compile_budget_s:
                break
            self._compiled_buckets = tuple(sorted({*self._compiled_buckets, bucket}))
            try:
                self._run_buckets((bucket,))  # forward() runs the compiled model for a compiled bucket
            except Exception as exc:
                if self.precision != "fp32":
                    raise  # warm_up falls back to fp32
                log.error("torch.compile failed (%s: %s); serving the eager model", type(exc).__name__,
                          str(exc)[:300])
                self._compiled, self._compiled_buckets = None, ()
                return
        skipped = sorted(set(cfg.compile_buckets) - set(self._compiled_buckets))
        log.info("torch.compile on (%s)%s: batch sizes %s compiled in %.1f s%s", reason, " with freezing" if freeze else "",
                 list(self._compiled_buckets),
                 time.perf_counter() - started,
                 f"; budget of {cfg.compile_budget_s:g} s spent: batch sizes {skipped} run eager" if skipped else "")

    @torch.inference_mode()
    def _run_buckets(self, buckets: tuple[int, ...]) -> None:
        size = self.config.image_size
        for bucket in buckets:
            self.forward(self.to_model_input(torch.zeros((bucket, 3, size, size), dtype=torch.uint8)))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Stop the loader workers and free their shared memory."""
        self.loader.close()
