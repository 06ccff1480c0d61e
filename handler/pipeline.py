"""The pipeline: loader items in, top-k predictions and failures by key out, in one call (``run``).

Two parts, built in order by one factory (``Pipeline.start``):

    decode     ``handler.decode.path.DecodePath``: the persistent multi-worker DataLoader (and, with
               ``decode_device: cuda``, nvJPEG lists on the GPU), chunks gathered into full
               batches on the device and normalized, as one iterable
    model      ``handler.model.runner.ModelRunner``: the model prepared for inference (BatchNorm
               folded, channels_last, optional buckets / compile) in the precision that works
               here, and its forward pass
    top-k      softmax and the k best labels per image, once the device is done
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from handler.config import HandlerConfig
from handler.decode.dataset import DecodedBatch, LoaderItem
from handler.decode.path import DecodePath
from handler.errors import ImageError
from handler.decode.gpu import BatchedJpegDecoder
from handler.decode.loader import PersistentImageLoader
from handler.metrics import StageClock
from handler.model.topk import Prediction, top_k_labels
from handler.model.records import ModelArtifacts
from handler.model.runner import ModelRunner
from handler.model.zoo import ZooFiles

log = logging.getLogger(__name__)



@dataclass
class RunResult:
    """What ``Pipeline.run`` made of its items: each good image's prediction and each bad
    image's failure, by key (every key is in exactly one of them)."""

    predictions: dict[int, Prediction] = field(default_factory=dict)
    failures: dict[int, ImageError] = field(default_factory=dict)


class Pipeline:
    """Decodes, batches and infers: a decode path and a model runner, and the labels."""

    def __init__(self, decoding: DecodePath, runner: ModelRunner, labels: list[str]) -> None:
        self.decoding, self.runner, self.labels = decoding, runner, labels
        self.config, self.device = decoding.config, decoding.device

    @classmethod
    def start(cls, config: HandlerConfig, labels: list[str], weights: Path | bytes | ZooFiles, device: torch.device,
              artifacts: ModelArtifacts = ModelArtifacts()) -> "Pipeline":
        """Fork the loader's workers (while this process is small and has no CUDA context), load
        and prepare the model on ``device``, set the decode path up there, then warm the model up
        (compiling each batch bucket: this can take minutes)."""
        decoding = DecodePath(config, device)
        try:
            decoding.start()
            runner = ModelRunner(config, weights, len(labels), device, artifacts)
            decoding.attach()
            decoding.warm_up()
            runner.warm_up(decoding.to_model_input)
        except BaseException:
            decoding.close()
            raise
        return cls(decoding, runner, labels)

    @torch.inference_mode()
    def run(self, items: list[LoaderItem], clock: StageClock | None = None, top_k: int | None = None) -> RunResult:
        """Every item's top-k prediction (``top_k`` classes, default the model's ``top_k``) or
        failure, by key. Decoding starts at once; each model batch runs as soon as it is
        complete, while the workers decode the next; the device is waited for once, at the
        end. Stage times go to ``clock``."""
        clock = clock if clock is not None else StageClock(self.device)
        batches = self.decoding.batches(items, clock)
        outputs: list[tuple[list[int], torch.Tensor]] = []
        for keys, inputs in batches:
            with clock.device("InferenceMs"):
                outputs.append((keys, self.runner.forward(inputs)))
        clock.resolve()  # the device is done: what follows is postprocessing's own time
        result = RunResult(failures=batches.failures)
        with clock.host("PostprocessMs"):
            for keys, logits in outputs:
                result.predictions.update(zip(keys, top_k_labels(logits, self.labels, top_k or self.config.top_k)))
        return result

    # ---- the parts, for adapters and benchmarks that drive them directly ---------------------

    @property
    def precision(self) -> str:
        return self.runner.precision

    @property
    def loader(self) -> PersistentImageLoader:
        return self.decoding.loader

    @property
    def jpeg_decoder(self) -> BatchedJpegDecoder | None:
        return self.decoding.jpeg_decoder

    @property
    def model(self) -> torch.nn.Module:
        return self.runner.model

    def decode(self, items: list[LoaderItem]) -> Iterator[DecodedBatch]:
        """Decoded uint8 chunks of ``items`` (``DecodePath.chunks``)."""
        return self.decoding.chunks(items)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model on a normalized batch (``ModelRunner.forward``)."""
        return self.runner.forward(x)

    def to_model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> normalized float on the device (``DecodePath.to_model_input``)."""
        return self.decoding.to_model_input(pixels)

    def close(self) -> None:
        """Stop the loader workers and free their shared memory."""
        self.decoding.close()
