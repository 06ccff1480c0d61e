"""Handler settings: one frozen dataclass, validated once from model-config.yaml's ``handler:``."""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
from dataclasses import dataclass
from typing import Any, Mapping

RESIZE_MODES = ("center_crop", "letterbox", "squash", "squash_center_crop", "border")
# Which pixel a centre crop starts at when the margin is odd: torchvision's CenterCrop rounds half
# the margin (timm uses it); Hugging Face's image processors take its floor.
CROP_OFFSETS = ("round", "floor")
INTERPOLATIONS = ("bilinear", "bicubic")
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
RUNTIMES = ("auto", "torch", "openvino")
DECODE_DEVICES = ("cpu", "cuda")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class HandlerConfig:
    """Every setting the handler reads. Defaults suit an ImageNet-style torchvision classifier.

    Attributes:
        arch: model architecture: ``shapes_cnn`` (the demo model) or any
            ``torchvision.models`` classification name, e.g. ``resnet18``; or the format of a
            whole serialized model: ``torchscript`` (.pt) or ``torch_export`` (.pt2).
        image_size: side of the square tensor the model sees.
        resize_size: the size resized to before the crop: in ``center_crop`` the shorter side,
            in ``squash_center_crop`` both sides, in ``border`` the longer side.
        resize_mode: ``center_crop`` (torchvision eval preset: shorter side to ``resize_size``,
            centre crop), ``letterbox`` (whole image, aspect kept, padded), ``squash`` (whole
            image stretched to a square), ``squash_center_crop`` (stretched to ``resize_size``
            square, then the centre crop: timm's ``squash`` with a crop_pct below 1, Hugging
            Face's height x width resize followed by a centre crop) or ``border`` (timm's: the
            longer side to ``resize_size``, aspect kept, then centre crop or pad to
            ``image_size`` with ``pad_value``).
        crop_offset: where an odd crop margin puts its extra pixel: ``round`` (torchvision's
            CenterCrop, as timm crops) or ``floor`` (Hugging Face's image processors).
        interpolation: ``bilinear`` or ``bicubic``, antialiased (as the model was trained).
        weights: a torchvision weights enum (``ResNet50_Weights.IMAGENET1K_V2``) whose eval
            preprocessing (crop, resize, interpolation, mean, std) fills the keys not given
            explicitly; nothing is downloaded (the weights themselves come with the model).
        pad_value: ``letterbox`` and ``border`` fill, 0-255: one value for every channel, or
            three (red, green, blue).
        use_test_size: a timm model folder's ``test_input_size`` / ``test_crop_pct`` instead of
            its ``input_size`` / ``crop_pct`` (timm's ``use_test_size``); timm folders only.
        mean, std: per-channel normalization applied to pixels scaled to [0, 1].
        top_k: classes returned per image.
        batch_size: images per model forward pass (decoded chunks are gathered up to it).
        loader_batch_size: images per DataLoader batch, at most; 0 = batch_size. Smaller chunks
            reach the model sooner (a GPU infers while the workers decode); each costs a round trip.
        num_workers: DataLoader worker processes (0 decodes in the handler process).
        pin_memory: pin host batches for fast, asynchronous copies to the GPU (CUDA only).
        mp_context: multiprocessing start method of the loader workers.
        inline_max_images: a server-side batch of at most this many images is decoded in the
            handler process (no worker round trip); more go through the DataLoader workers.
        max_images_per_request: more images than this in one request is a 413.
        max_image_pixels: an image with more pixels (width x height) is a 413.
        decode_device: ``cpu`` (DataLoader workers) or ``cuda``: JPEGs are decoded in batches
            on the GPU with nvJPEG and resized there; other images, and JPEGs nvJPEG rejects,
            still take the CPU path. Ignored (with a warning) when the model runs on the CPU.
        decode_ahead: with ``decode_device: cuda``, a thread of its own decodes the nvJPEG lists
            ahead while the handler thread runs the model (nvJPEG blocks its caller per list).
        cpu_decode_share: with ``decode_device: cuda``, this fraction of the JPEGs still goes
            to the DataLoader workers, which decode it while the GPU decodes the rest (otherwise
            the CPU cores idle while nvJPEG and the model take turns on the GPU).
        jpeg_draft: let libjpeg downscale large JPEGs while decoding (DCT scaling).
        jpeg_draft_margin: DCT scaling stops at this many times the size the resize needs, so the
            antialiased resize still downscales after it (1.0: fastest, further from the stock
            pipeline's pixels).
        precision: ``auto`` (the default): bf16 on a CPU where bf16 is faster than fp32
            (AMX; AVX512-BF16 alone measured no faster) and the model's gate record
            (``gate_record.json``, ``handler.model.records``) says bf16 passed for these very
            weights; fp32 otherwise (GPUs included), and the log says how to gate; ``fp32``; ``bf16`` (on the CPU the
            weights converted, ``handler.model.precision.Bf16Model``; on a GPU autocast); ``fp16``
            (CUDA autocast); ``int8``: the calibrated program that ``build_mar.py --calibrate``
            stores in the archive (CPU, compiled only). What cannot run here runs fp32, with an
            error in the log (``handler.model.precision``, the module).
        runtime: what runs the model on a CPU: ``auto`` (the default): OpenVINO where it is
            installed and converts the model, torch otherwise; ``torch`` (eager or
            ``torch.compile``); ``openvino`` (the model converted once and cached by its weights'
            hash, ``handler.model.ov_runtime``). A model OpenVINO cannot convert runs on torch,
            with one log line; on a GPU the model runs on torch. int8 runs on OpenVINO when the model has
            OpenVINO's int8 model, else torch's PT2E program on torch.
        batch_buckets: pad every forward pass to the smallest of these batch sizes that fits, so
            the model only ever sees a few fixed shapes (each is warmed up in initialize). Empty:
            no padding, except for a compiled model, which gets ``compile_buckets``.
        cudnn_benchmark: let cuDNN pick the fastest kernels per shape; only with batch_buckets,
            since every new shape is re-tuned (seconds each).
        fuse_batchnorm: fold each Conv -> BatchNorm pair into the conv at load time (same
            function, checked on a test input; skipped for models that cannot be traced).
        compile: ``auto`` (the default): ``torch.compile`` the model when it runs on the CPU and a
            working C++ compiler is there (inductor needs one), eager otherwise; ``true``: always;
            ``false``: never. Each batch bucket is compiled once at start-up; a failed compile
            falls back to eager with an error in the log.
        compile_mode: ``torch.compile`` mode: default, reduce-overhead, max-autotune or
            max-autotune-no-cudagraphs.
        compile_budget_s: start-up time compiling may take: the largest bucket is always
            compiled; once the budget is spent no further bucket starts, and batch sizes without
            a compiled bucket run eager.
        intra_op_threads: torch threads of each TorchServe worker for the model; 0 shares the
            machine's cores among the model's maxWorkers backend workers (on a GPU: 2, since
            the model runs there and the cores are the loader workers').
        worker_nice: with the model on a GPU, the loader workers run at this lower priority
            (``nice``), so that the handler thread that feeds the GPU never waits for a core.
            On a CPU device they keep normal priority (decoding and the model share the cores).
        request_timeout_ms: how long a request may wait before it is run, counted from its
            receipt, when the request sets no timeout of its own (``X-Request-Timeout-Ms``, v2
            ``parameters.timeout``, ...); past it the request is answered 504
            ``deadline_exceeded`` without being decoded. 0 (the default): no server-side limit.
        max_queued_images: images a door that queues requests itself (KServe, Ray Serve) holds
            admitted and unanswered at most; a request that would go past it is answered at once
            with 503 ``overloaded`` and a ``Retry-After``. At least ``max_images_per_request``.
            (TorchServe's frontend owns its queue: its ``job_queue_size`` bounds it, in requests.)
        drain_timeout_s: on SIGTERM a door stops admitting and finishes what it admitted for at
            most this long before it exits.
        keep_freed_memory: have glibc serve blocks up to 32 MB from its heap and keep freed
            memory for the next batch, instead of mapping every batch's tensors fresh from the
            kernel (page faults); the worker's memory then stays at its peak.
    """

    arch: str = "resnet18"
    image_size: int = 224
    resize_size: int = 256
    resize_mode: str = "center_crop"
    crop_offset: str = "round"
    interpolation: str = "bilinear"
    weights: str = ""
    pad_value: int | tuple[int, int, int] = 0
    use_test_size: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    top_k: int = 5
    batch_size: int = 32
    loader_batch_size: int = 0
    num_workers: int = 2
    pin_memory: bool = True
    mp_context: str = "fork"
    inline_max_images: int = 1
    max_images_per_request: int = 64
    max_image_pixels: int = 50_000_000
    decode_device: str = "cpu"
    cpu_decode_share: float = 0.0
    decode_ahead: bool = True
    jpeg_draft: bool = True
    jpeg_draft_margin: float = 1.5
    precision: str = "auto"
    runtime: str = "auto"
    batch_buckets: tuple[int, ...] = ()
    cudnn_benchmark: bool = False
    fuse_batchnorm: bool = True
    compile: bool | str = "auto"
    compile_mode: str = "default"
    compile_budget_s: float = 300.0
    intra_op_threads: int = 0
    worker_nice: int = 10
    keep_freed_memory: bool = True
    request_timeout_ms: float = 0.0
    max_queued_images: int = 512
    drain_timeout_s: float = 30.0

    @property
    def loader_chunk(self) -> int:
        """Images per DataLoader batch, at most."""
        return self.loader_batch_size or self.batch_size

    @property
    def pad_rgb(self) -> tuple[int, int, int]:
        """``pad_value`` as one value per channel."""
        value = self.pad_value
        return (value, value, value) if isinstance(value, int) else value

    @property
    def compile_buckets(self) -> tuple[int, ...]:
        """The batch sizes a compiled model runs (padded up to): ``batch_buckets``, or the powers of
        two below ``batch_size`` and ``batch_size`` itself (padding a batch costs at most as much
        again as the batch; each bucket costs a compile at start-up)."""
        if self.batch_buckets:
            return self.batch_buckets
        return tuple(b for b in (1 << i for i in range(self.batch_size.bit_length())) if b < self.batch_size) + (
            self.batch_size,)

    def __post_init__(self) -> None:
        _positive("image_size", self.image_size)
        _positive("resize_size", self.resize_size)
        _positive("top_k", self.top_k)
        _positive("batch_size", self.batch_size)
        _positive("max_images_per_request", self.max_images_per_request)
        _positive("max_image_pixels", self.max_image_pixels)
        if not all(math.isfinite(v) and v >= 0 for v in (self.request_timeout_ms, self.drain_timeout_s)):
            raise ValueError(f"handler.request_timeout_ms and drain_timeout_s must be finite and >= 0, got "
                             f"{self.request_timeout_ms} and {self.drain_timeout_s}")
        if self.max_queued_images < self.max_images_per_request:
            raise ValueError(f"handler.max_queued_images ({self.max_queued_images}) must be at least "
                             f"max_images_per_request ({self.max_images_per_request}): a request that size "
                             "could never be admitted")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"handler.runtime must be one of {', '.join(RUNTIMES)}; got {self.runtime!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"handler.precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        buckets = self.batch_buckets
        if buckets and (list(buckets) != sorted(set(buckets)) or buckets[0] <= 0):
            raise ValueError(f"handler.batch_buckets must be increasing positive sizes, got {list(buckets)}")
        if buckets and buckets[-1] < self.batch_size:
            raise ValueError(
                f"handler.batch_buckets must include a size >= batch_size ({self.batch_size}), got {list(buckets)}"
            )
        if self.cudnn_benchmark and not buckets:
            raise ValueError(
                "handler.cudnn_benchmark needs handler.batch_buckets: without fixed batch sizes cuDNN "
                "re-tunes for every new shape"
            )
        if not (isinstance(self.compile, bool) or self.compile == "auto"):  # 1 == True, but 1 is not a switch
            raise ValueError(f"handler.compile must be true, false or auto; got {self.compile!r}")
        if not self.compile_budget_s > 0:
            raise ValueError(f"handler.compile_budget_s must be > 0, got {self.compile_budget_s}")
        if self.decode_device not in DECODE_DEVICES:
            raise ValueError(
                f"handler.decode_device must be one of {', '.join(DECODE_DEVICES)}; got {self.decode_device!r}"
            )
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"handler.compile_mode must be one of {', '.join(COMPILE_MODES)}; got {self.compile_mode!r}"
            )
        if not self.jpeg_draft_margin >= 1.0:
            raise ValueError(f"handler.jpeg_draft_margin must be >= 1, got {self.jpeg_draft_margin}")
        if self.loader_batch_size < 0:
            raise ValueError(f"handler.loader_batch_size must be >= 0, got {self.loader_batch_size}")
        if not 0.0 <= self.cpu_decode_share <= 1.0:
            raise ValueError(f"handler.cpu_decode_share must be between 0 and 1, got {self.cpu_decode_share}")
        if self.inline_max_images < 0:
            raise ValueError(f"handler.inline_max_images must be >= 0, got {self.inline_max_images}")
        if not 0 <= self.worker_nice <= 19:
            raise ValueError(f"handler.worker_nice must be within 0..19, got {self.worker_nice}")
        if self.intra_op_threads < 0:
            raise ValueError(f"handler.intra_op_threads must be >= 0, got {self.intra_op_threads}")
        if self.num_workers < 0:
            raise ValueError(f"handler.num_workers must be >= 0, got {self.num_workers}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"handler.interpolation must be one of {', '.join(INTERPOLATIONS)}; got {self.interpolation!r}"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(
                f"handler.resize_mode must be one of {', '.join(RESIZE_MODES)}; got {self.resize_mode!r}"
            )
        if self.resize_mode in ("center_crop", "squash_center_crop") and self.resize_size < self.image_size:
            raise ValueError(
                f"handler.resize_size ({self.resize_size}) must be >= image_size ({self.image_size}) "
                f"in resize_mode {self.resize_mode}"
            )
        if self.crop_offset not in CROP_OFFSETS:
            raise ValueError(f"handler.crop_offset must be one of {', '.join(CROP_OFFSETS)}; got {self.crop_offset!r}")
        if not all(0 <= v <= 255 for v in self.pad_rgb):
            raise ValueError(f"handler.pad_value must be within 0..255, got {self.pad_value}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"handler.std values must be > 0, got {list(self.std)}")
        if self.mp_context not in multiprocessing.get_all_start_methods():
            raise ValueError(
                f"handler.mp_context must be one of {multiprocessing.get_all_start_methods()}, "
                f"got {self.mp_context!r}"
            )

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any] | None) -> "HandlerConfig":
        """Build from the YAML ``handler:`` mapping; unknown keys and wrong types are errors.
        A ``weights`` preset fills the preprocessing keys the mapping does not set itself."""
        settings = dict(settings or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - set(fields))
        if unknown:
            raise ValueError(
                f"unknown handler setting {unknown[0]!r} in model-config.yaml; "
                f"known settings: {', '.join(sorted(fields))}"
            )
        if settings.get("weights"):
            preset = weights_preset(_coerce("weights", "", settings["weights"]), settings.get("arch", cls.arch))
            settings = {**preset, **settings}
        values = {name: _coerce(name, fields[name].default, value) for name, value in settings.items()}
        return cls(**values)


def weights_preset(name: str, arch: str) -> dict[str, Any]:
    """The eval preprocessing of torchvision weights ``name`` (e.g. ``ResNet50_Weights.IMAGENET1K_V2``)
    as handler settings. Reads the enum's metadata only: nothing is downloaded."""
    from torchvision import models

    try:
        weights = models.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise ValueError(
            f"handler.weights {name!r} is not a torchvision weights name such as 'ResNet50_Weights.IMAGENET1K_V2'"
        ) from None
    if arch in models.list_models(module=models) and not isinstance(weights, models.get_model_weights(arch)):
        raise ValueError(f"handler.weights {name!r} belongs to another architecture than arch {arch!r}")
    preset = weights.transforms()
    return {
        "image_size": int(preset.crop_size[0]),
        "resize_size": int(preset.resize_size[0]),
        "resize_mode": "center_crop",
        "interpolation": preset.interpolation.value,
        "mean": tuple(float(v) for v in preset.mean),
        "std": tuple(float(v) for v in preset.std),
    }


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"handler.{name} must be > 0, got {value}")


def _coerce(name: str, default: Any, value: Any) -> Any:
    """Check a YAML value against the type of the field's default and convert it."""
    where = f"handler.{name}"
    if name == "compile":  # a switch with a third state: __post_init__ checks it
        return value
    if name == "pad_value":  # one value, or one per channel
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, (list, tuple)) and len(value) == 3 and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
        raise ValueError(f"{where} must be an integer or a list of 3 integers, got {value!r}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, tuple) and not default:  # a variable-length list of integers
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ValueError(f"{where} must be a list of integers, got {value!r}")
        return tuple(value)
    if isinstance(default, tuple):
        if (
            not isinstance(value, (list, tuple))
            or len(value) != len(default)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ):
            raise ValueError(f"{where} must be a list of {len(default)} numbers, got {value!r}")
        return tuple(float(v) for v in value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} must be a non-empty string, got {value!r}")
    return value
