"""OpenVINO as the model's CPU runtime: the fp32 model converted once, cached by its weights'
hash, compiled by OpenVINO's CPU plugin in fp32 or bf16 (its precision hint).

    openvino_problem()          None when OpenVINO is installed, else why not
    load_openvino(...)          the converted model (from the cache, or converted now and cached)
    OpenVinoModel(model, ...)   compiled for the CPU; called like a torch module on normalized
                                float batches, fp32 logits out

The converted model is the handler's own fp32 model (BatchNorm folded), traced with a dynamic
batch dimension. The cache (``$HANDLER_CACHE_DIR``, else ``~/.cache/batched-image-handler``)
holds one folder per weights hash, architecture, class count, input size and OpenVINO version,
so a restart (a new TorchServe worker, a Ray replica, ``classify.py``) reads it instead of
converting (seconds). Inputs are normalized by the decode path as for torch, so both runtimes
see the same numbers.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from handler.config import HandlerConfig
from handler.model.optimize import prepare_for_inference
from handler.model.zoo import ZooFiles

log = logging.getLogger(__name__)

CACHE_ENV = "HANDLER_CACHE_DIR"
IR_NAME = "model.xml"  # OpenVINO's IR: the graph (.xml) and its weights (.bin) beside it
# The int8 model NNCF quantized at archive time, in a model folder or archive: graph and weights.
INT8_IR = ("openvino_int8.xml", "openvino_int8.bin")
# OpenVINO's precision hint for each precision this runtime runs (int8: the quantized model's
# int8 layers run int8 whatever the hint; the rest runs fp32).
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


@functools.lru_cache(maxsize=1)
def openvino_problem() -> str | None:
    """None when ``import openvino`` works here, else what is wrong."""
    try:
        import openvino  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install (missing shared libraries)
        return f"OpenVINO does not import ({type(exc).__name__}: {str(exc)[:160]})"
    return None


def cache_root() -> Path:
    """Where converted models are kept: ``$HANDLER_CACHE_DIR/openvino``, else under ~/.cache."""
    base = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "batched-image-handler")
    return Path(base) / "openvino"


def cache_folder(config: HandlerConfig, num_classes: int, weights_hash: str) -> Path:
    """The cache folder of one converted model: everything the conversion depends on is in its name."""
    import openvino as ov

    version = ov.__version__.split("-")[0]
    fold = "bnfold" if config.fuse_batchnorm else "nofold"
    # torch's version too: the graph converted is what this torch builds and folds from the weights.
    return cache_root() / (f"{config.arch}-{num_classes}c-{config.image_size}px-{fold}-"
                           f"{weights_hash[:24]}-ov{version}-torch{torch.__version__.split('+')[0]}")


def load_openvino(config: HandlerConfig, weights: Path | bytes | ZooFiles, num_classes: int,
                  weights_hash: str) -> tuple[Any, str]:
    """The converted model (an ``openvino.Model``) and where it came from: the cache, or converted
    now from the handler's fp32 model and written to the cache (an unwritable cache only logs).
    Raises what conversion raises for a model OpenVINO cannot take."""
    import openvino as ov

    if isinstance(weights, ZooFiles):  # the architecture is in config.json, beside the weights
        source = weights.files["config.json"]
        text = source if isinstance(source, bytes) else source.read_bytes()
        weights_hash = hashlib.sha256(weights_hash.encode() + text).hexdigest()
    folder = cache_folder(config, num_classes, weights_hash)
    core = ov.Core()
    if (folder / IR_NAME).is_file():
        try:
            return core.read_model(str(folder / IR_NAME)), f"read from {folder}"
        except Exception as exc:  # a torn or foreign cache entry: convert again
            log.warning("OpenVINO cache %s unreadable (%s); converting again", folder, str(exc)[:200])
            shutil.rmtree(folder, ignore_errors=True)
    model = prepare_for_inference(config, weights, num_classes)
    size = config.image_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    # Tracing needs grad mode's tensors: converting inside inference_mode fails.
    with torch.inference_mode(False), torch.no_grad():
        converted = ov.convert_model(model.to(memory_format=torch.contiguous_format), example_input=example,
                                     input=[(-1, 3, size, size)])
    _save(converted, folder)
    return converted, f"converted now (cached in {folder})"


def _save(model: Any, folder: Path) -> None:
    """Write the IR to ``folder`` atomically (a second process converting at once is harmless)."""
    import openvino as ov

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
        # Full fp32 weights: save_model would otherwise halve them to fp16.
        ov.save_model(model, str(staging / IR_NAME), compress_to_fp16=False)
        if folder.exists() and not (folder / IR_NAME).is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a torn entry (no graph): replaced
        try:
            staging.rename(folder)
        except OSError:  # another process got there first
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        log.warning("OpenVINO: the converted model is not cached (%s): the next start converts again", exc)


class OpenVinoModel(nn.Module):
    """A converted model compiled for the CPU, called like the torch model it replaces: normalized
    float NCHW in, fp32 logits out. One inference at a time (a lock): the handler runs one batch
    at a time anyway."""

    def __init__(self, model: Any, precision: str, threads: int) -> None:
        super().__init__()
        import openvino as ov

        self.precision = precision
        config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "INFERENCE_NUM_THREADS": threads,
                  "PERFORMANCE_HINT": "LATENCY"}
        self._compiled = ov.Core().compile_model(model, "CPU", config)
        ran = str(self._compiled.get_property("INFERENCE_PRECISION_HINT"))
        if precision == "bf16" and "bfloat16" not in ran and "bf16" not in ran:
            # A CPU without bf16 support keeps f32 silently: that is not bf16 (nor what a gate measures).
            raise RuntimeError(f"OpenVINO runs this model in {ran} on this CPU, not bf16")
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.float().contiguous().numpy()  # NCHW, as converted
        with self._lock:
            out = self._request.infer({0: array})[0]
            return torch.from_numpy(out.copy())  # the request's buffer is reused by the next call


def resolve_runtime(setting: str, device: torch.device, precision: str, *, openvino_int8: bool = False,
                    torch_int8: bool = False) -> tuple[str, str]:
    """``torch`` or ``openvino`` for ``handler.runtime`` ``setting``, and why. OpenVINO runs the
    model on the CPU only, in fp32, bf16, or int8 when the model has its NNCF int8 model
    (``openvino_int8``; else int8 is torch's PT2E program, ``torch_int8``); ``auto`` picks it on a
    CPU where it is installed: measured faster than inductor (docs/precision.md), and it starts
    from its cache without compiling."""
    if setting == "torch":
        return "torch", "handler.runtime is torch"
    if device.type != "cpu":
        return "torch", f"handler.runtime is {setting} and the model is on {device.type} (OpenVINO runs it on the CPU)"
    if precision == "int8" and not openvino_int8:
        return "torch", (f"handler.runtime is {setting} and the model's int8 is "
                         f"{'a torch (PT2E) program' if torch_int8 else 'not there'} (no OpenVINO int8 model)")
    if precision not in PRECISION_HINTS and precision != "auto":
        return "torch", f"handler.runtime is {setting} and precision {precision} runs on torch"
    problem = openvino_problem()
    if problem is not None:
        return "torch", f"handler.runtime is {setting} but {problem}"
    return "openvino", f"handler.runtime is {setting} and OpenVINO is installed"


def read_int8(ir: tuple[Path | bytes, Path | bytes]) -> Any:
    """The int8 model of a folder (files) or an archive (bytes): its graph and weights."""
    import numpy as np
    import openvino as ov

    graph, weights = ir
    core = ov.Core()
    if isinstance(graph, Path) and isinstance(weights, Path):
        return core.read_model(str(graph), str(weights))
    graph_text = graph.decode() if isinstance(graph, bytes) else graph.read_text()
    data = weights if isinstance(weights, bytes) else weights.read_bytes()
    return core.read_model(graph_text, ov.Tensor(np.frombuffer(data, dtype=np.uint8).copy()))


def quantize_openvino(config: HandlerConfig, weights: Path | bytes | ZooFiles, num_classes: int,
                      weights_hash: str, batches: list[torch.Tensor], folder: Path) -> None:
    """Quantize the converted model to int8 with NNCF's post-training quantization, its
    activation ranges observed on ``batches`` (normalized model input), and write it to
    ``folder`` under INT8_IR's names."""
    import nncf
    import openvino as ov

    model, _ = load_openvino(config, weights, num_classes, weights_hash)
    data = [b.float().contiguous().numpy() for b in batches]
    quantized = nncf.quantize(model, nncf.Dataset(data), subset_size=sum(len(b) for b in data))
    ov.save_model(quantized, str(folder / INT8_IR[0]), compress_to_fp16=False)
