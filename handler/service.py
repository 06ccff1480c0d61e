"""The TorchServe handler: one class that wires decode -> DataLoader -> model -> top-k.

TorchServe requires exactly one class in the handler module; everything else lives in sibling
modules of the ``handler`` package.
"""

from __future__ import annotations

import json
import logging
import os
from http import HTTPStatus
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from PIL import Image

from handler.assemble import BatchAssembler
from handler.batching import FlatBatch, Outcomes, ScoredBatch, flatten, split
from handler.config import HandlerConfig
from handler.dataset import DecodedBatch, ImageBytesDataset, LoaderItem
from handler.decode import ParsedRequest, parse_request
from handler.errors import RequestError
from handler.gpu_decode import BatchedJpegDecoder
from handler.images import ImageTransform
from handler.loader import PersistentImageLoader
from handler.memory import keep_freed_memory
from handler.metrics import StageClock, publish
from handler.model_loading import load_labels, load_model
from handler.normalize import Normalizer
from handler.optimize import compile_model, fold_batchnorm
from handler.postprocess import top_k_labels
from handler.responses import Prediction, success_body

log = logging.getLogger(__name__)

# Torch threads of a handler whose model is on a GPU (host-side ops only: the rest is the GPU's).
GPU_HOST_THREADS = 2


class ImageBatchHandler:
    """Many images per request, many requests per batch; bad requests fail alone."""

    def __init__(self) -> None:
        self.initialized = False
        self.config = HandlerConfig()
        self.device = torch.device("cpu")
        self.labels: list[str] = []
        self.model: torch.nn.Module | None = None
        self.loader: PersistentImageLoader | None = None
        self.jpeg_decoder: BatchedJpegDecoder | None = None

    # ---- start-up -------------------------------------------------------------------------

    def initialize(self, context: Any) -> None:
        """Validate the config, start the loader workers, then load the model onto its device."""
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        model_yaml = getattr(context, "model_yaml_config", None) or {}
        self.config = cfg = HandlerConfig.from_mapping(model_yaml.get("handler"))
        if cfg.keep_freed_memory:
            keep_freed_memory()  # before the loader workers fork, so they have it too
        # Keep Pillow's decompression-bomb guard on, at our limit (the stock handler turns it off).
        Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels
        self.device = select_device(properties.get("gpu_id"))
        torch.set_num_threads(thread_budget(cfg.intra_op_threads, model_yaml.get("maxWorkers", 1), self.device))

        self.loader = PersistentImageLoader(
            ImageBytesDataset(ImageTransform(cfg)),
            batch_size=cfg.loader_chunk,
            num_workers=cfg.num_workers,
            image_size=cfg.image_size,
            pin_memory=cfg.pin_memory and self.device.type == "cuda",
            mp_context=cfg.mp_context,
            inline_max_images=cfg.inline_max_images,
            worker_nice=cfg.worker_nice if self.device.type == "cuda" else 0,
        )
        # Fork the workers while this process is small and has no CUDA context.
        self.loader.start()

        self.labels = load_labels(model_dir / "index_to_name.json")
        self.model = self._prepare_model(model_dir / context.manifest["model"]["serializedFile"])
        self._prepare_device()
        self.warm_up()
        self.initialized = True
        log.info("handler ready: arch=%s device=%s config=%s", cfg.arch, self.device, cfg)

    def _prepare_model(self, weights: Path) -> torch.nn.Module:
        """Load, fold BatchNorm, move to the device in channels_last, optionally compile."""
        cfg = self.config
        model = load_model(cfg.arch, weights, len(self.labels))
        if cfg.fuse_batchnorm:
            example = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
            model = fold_batchnorm(model, example)
        model = model.to(self.device, memory_format=torch.channels_last)
        return compile_model(model, cfg.compile_mode) if cfg.compile else model

    def _prepare_device(self) -> None:
        """Normalization constants on the device; on CUDA the pinned staging ring, cuDNN
        autotuning and the nvJPEG decoder."""
        cfg = self.config
        self._normalize = Normalizer(cfg.mean, cfg.std, self.device)
        self._autocast_dtype = autocast_dtype(cfg.precision, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
            if cfg.pin_memory:
                assert self.loader is not None
                self.loader.pin_staging()
        if cfg.decode_device == "cuda":
            if self.device.type == "cuda":
                self.jpeg_decoder = BatchedJpegDecoder(cfg, self.device)
            else:
                log.warning("decode_device cuda needs the model on a GPU; decoding on the CPU")

    # ---- one server-side batch ------------------------------------------------------------

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        """One response body per request, in order; bad requests get their own 4xx status."""
        clock = StageClock(self.device)
        requests = self.parse(data)
        flat = flatten(requests)
        scored = self.inference(self.preprocess(flat), clock)
        clock.resolve()  # the device is done: what follows is postprocessing's own time
        with clock.host("PostprocessMs"):
            outcomes = self.predictions(scored)
            bodies, errors = self.postprocess(requests, flat, outcomes, context)
        publish(getattr(context, "metrics", None), clock, images=len(flat.items), requests=len(data),
                bad_images=len(outcomes.failures), rejected=len(errors))
        return bodies

    def parse(self, data: list[dict[str, Any]]) -> list[ParsedRequest | RequestError]:
        """Each request row -> its images, or the RequestError that rejects it."""
        parsed: list[ParsedRequest | RequestError] = []
        for row in data:
            try:
                parsed.append(parse_request(row, self.config.max_images_per_request))
            except RequestError as exc:
                parsed.append(exc)
        return parsed

    def preprocess(self, flat: FlatBatch) -> Iterator[DecodedBatch]:
        """Decode and resize every image through the persistent multi-worker DataLoader (and,
        with ``decode_device: cuda``, the JPEGs in batches on the GPU).

        Lazy: batches are yielded as they are ready, so the model can run on the first while
        the workers still decode the next.
        """
        assert self.loader is not None, "initialize() has not run"
        if self.jpeg_decoder is None:
            return self.loader.iterate(flat.items)
        return self._decode_on_device(flat.items)

    def _decode_on_device(self, items: list[LoaderItem]) -> Iterator[DecodedBatch]:
        assert self.loader is not None and self.jpeg_decoder is not None
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

    @torch.inference_mode()
    def inference(self, batches: Iterable[DecodedBatch], clock: StageClock) -> list[ScoredBatch[torch.Tensor]]:
        """The model's logits for the decoded images, in batches of ``batch_size`` (chunks
        gathered on the device), each run as soon as it is complete."""
        assert self.model is not None, "initialize() has not run"
        assembler = BatchAssembler(self.config.batch_size, self.device, self.to_model_input, self.copied_event)
        scored: list[ScoredBatch[torch.Tensor]] = []
        pending = iter(batches)
        while True:
            with clock.host("DecodeTransformMs"):  # waiting for the loader workers
                chunk = next(pending, None)
            if chunk is not None and chunk.device_events is not None:  # decoded on the GPU: device time
                clock.add_events("DecodeTransformMs", *chunk.device_events)
            with clock.device("HostToDeviceMs"):
                ready = assembler.finish() if chunk is None else assembler.add(chunk)
            for batch in ready:
                logits = None
                if batch.inputs is not None:
                    with clock.device("InferenceMs"):
                        logits = self.forward(batch.inputs)
                scored.append(ScoredBatch(batch.keys, batch.failures, logits))
            if chunk is None:
                return scored

    def warm_up(self) -> None:
        """Run each batch bucket once (and nvJPEG), so cuDNN tuning, torch.compile and lazy
        initialization happen here, not in the first requests. A compile that fails falls back
        to eager."""
        if self.jpeg_decoder is not None and not self.jpeg_decoder.warm_up():  # nvJPEG sets up on first use
            log.warning("batched GPU JPEG decode does not work here; decoding every image on the CPU")
            self.jpeg_decoder = None
        try:
            self._run_buckets()
        except Exception as exc:
            eager = getattr(self.model, "_orig_mod", None)  # set by torch.compile
            if eager is None:
                raise
            log.error("torch.compile failed (%s: %s); serving the eager model", type(exc).__name__, str(exc)[:300])
            self.model = eager
            self._run_buckets()

    @torch.inference_mode()
    def _run_buckets(self) -> None:
        size = self.config.image_size
        for bucket in self.config.batch_buckets:
            pixels = torch.zeros((bucket, 3, size, size), dtype=torch.uint8)
            self.forward(self.to_model_input(pixels))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model on ``x`` padded to its batch bucket, in the configured precision."""
        assert self.model is not None, "initialize() has not run"
        count = x.shape[0]
        bucket = next((b for b in self.config.batch_buckets if b >= count), count)
        if bucket > count:
            x = torch.cat([x, x.new_zeros((bucket - count, *x.shape[1:]))]).contiguous(
                memory_format=torch.channels_last
            )
        if self._autocast_dtype is None:
            return self.model(x)[:count]
        with torch.autocast(self.device.type, dtype=self._autocast_dtype):
            return self.model(x)[:count].float()

    def copied_event(self) -> Any:
        """On CUDA, an event that completes once the work enqueued so far (the copy) is done."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def to_model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW (pinned on CUDA) -> normalized float on the device, channels_last."""
        return self._normalize(pixels)

    def predictions(self, scored: list[ScoredBatch[torch.Tensor]]) -> Outcomes[Prediction]:
        """Top-k per good image and the failures, keyed by image."""
        outcomes: Outcomes[Prediction] = Outcomes()
        for batch in scored:
            outcomes.failures.update(batch.failures)
            if batch.outputs is not None:
                top = top_k_labels(batch.outputs, self.labels, self.config.top_k)
                outcomes.results.update(zip(batch.keys, top))
        return outcomes

    def postprocess(
        self,
        requests: list[ParsedRequest | RequestError],
        flat: FlatBatch,
        outcomes: Outcomes[Prediction],
        context: Any,
    ) -> tuple[list[str], list[RequestError]]:
        """JSON body per request (an object for one image, a list for several, an error body for a
        4xx) and the errors that were answered."""
        grouped = split(flat, outcomes, len(requests))
        bodies: list[str] = []
        errors: list[RequestError] = []
        for idx, (request, result) in enumerate(zip(requests, grouped)):
            error = request if isinstance(request, RequestError) else result
            context.set_response_content_type(idx, "application/json")
            if isinstance(error, RequestError):
                log.info("request %d rejected: %s", idx, error)
                context.set_response_status(error.status, HTTPStatus(error.status).phrase, idx)
                bodies.append(json.dumps(error.as_json()))
                errors.append(error)
                continue
            assert isinstance(request, ParsedRequest) and isinstance(result, list)
            bodies.append(success_body(request, result, getattr(context, "model_name", None)))
        return bodies, errors


def thread_budget(configured: int, backend_workers: Any, device: torch.device | None = None) -> int:
    """Intra-op threads for this worker: as configured, or the cores shared among the backend
    workers (several workers each using every core would oversubscribe the machine). The loader
    workers run one thread each, and decoding and inference take turns, not overlap. With the
    model on a GPU the handler's own CPU work is small: GPU_HOST_THREADS, and the cores are
    left to the loader workers."""
    if configured > 0:
        return configured
    workers = backend_workers if isinstance(backend_workers, int) and backend_workers > 0 else 1
    share = max(1, (os.cpu_count() or 1) // workers)
    return min(share, GPU_HOST_THREADS) if device is not None and device.type == "cuda" else share


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None runs in fp32."""
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type != "cuda":
        log.warning("precision fp16 needs CUDA; running in fp32 on %s", device)
        return None
    return torch.float16 if precision == "fp16" else torch.bfloat16


def select_device(gpu_id: Any) -> torch.device:
    """The GPU TorchServe assigned to this worker when CUDA is available, else the CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")
