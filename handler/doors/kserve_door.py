"""The KServe door: KServe's Python model server (``kserve.Model``) over the core classifier.

    python -m handler.doors.kserve_door --model_name NAME --model_dir DIR --http_port P --grpc_port Q
                                    [--max_batch_delay_ms 5] [--device auto]

DIR holds the model files (index_to_name.json, weights, model-config.yaml) or a .mar, as KServe's
storage initializer mounts them. KServe serves v1 (``/v1/models/NAME:predict``), the Open
Inference Protocol v2 over REST and gRPC, health, readiness, model metadata and Prometheus
metrics (``/metrics`` on the HTTP port); this module adds what it lacks for images:
- BYTES elements sent with the binary tensor data extension over REST reach the model as bytes
  (KServe 0.21 would decode them as UTF-8 text and fail on any JPEG);
- concurrent requests are batched, counted in images (``handler.serving``'s loop);
- a bad request gets its own 4xx with the same JSON error body as the TorchServe door;
- production traffic (``handler.serving``): past ``max_queued_images`` a request is answered at
  once with 503 ``overloaded`` and ``Retry-After`` (gRPC UNAVAILABLE); a request's timeout
  (``X-Request-Timeout-Ms``, v2 ``parameters.timeout``, the gRPC deadline) or the model's
  ``request_timeout_ms`` that passes before it runs is a 504 ``deadline_exceeded`` (gRPC
  DEADLINE_EXCEEDED); per-request ``top_k``; the queue depth as Prometheus gauges;
- readiness follows the model's health (``ServingLoop.healthy``) and is false while the door
  sheds load or drains;
- SIGTERM (or SIGINT) drains: readiness false, new requests 503 ``shutting_down``, the admitted
  ones answered within ``drain_timeout_s``, then the servers stop and the process exits 0; a
  second signal stops at once.
Answers are those of the TorchServe door: v2 has one BYTES output ``predictions``, one JSON
string per image; v1 ``{"predictions": [...]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kserve
from fastapi.responses import JSONResponse
from grpc import StatusCode
from grpc_interceptor.exceptions import GrpcException
from kserve import InferInput, InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.errors import InvalidInput
from kserve.protocol.grpc import servicer as grpc_servicer
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import RequestedOutput
from prometheus_client import Counter, Gauge, Histogram

from handler import telemetry
from handler.classifier import ImageClassifier
from handler.errors import RequestError
from handler.protocols import ParsedRequest, Prediction, error_reply, kserve_v2
from handler.protocols.options import TRANSPORT_TIMEOUT_HEADER
from handler.serving import ServingLoop
from handler.telemetry import BatchFigures, MetricSpec

# Named, not __name__: run as `python -m` this module is __main__, outside the "handler" logger.
log = logging.getLogger("handler.doors.kserve_door")

INPUT = "images"
GRPC_ANSWER_MARGIN_MS = 250.0


def _labels(spec: MetricSpec) -> list[str]:
    return ["model_name", *spec.labels]


# Registered once per process, in prometheus_client's default registry (KServe's /metrics).
HISTOGRAMS = {spec.name: Histogram(spec.name, spec.help, _labels(spec), buckets=spec.buckets)
              for spec in telemetry.METRICS if spec.kind == "histogram"}
COUNTERS = {spec.name: Counter(spec.name, spec.help, _labels(spec))
            for spec in telemetry.METRICS if spec.kind == "counter"}
GAUGES = {spec.name: Gauge(spec.name, spec.help, _labels(spec)) for spec in telemetry.METRICS if spec.kind == "gauge"}


class PrometheusMetrics:
    """The METRICS (``handler.telemetry``) into Prometheus, labelled with the model's name."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name

    def batch(self, figures: BatchFigures) -> None:
        stage = HISTOGRAMS[telemetry.STAGE_MS.name]
        for name, ms in figures.timings.items():
            stage.labels(self.model_name, name).observe(ms)
        HISTOGRAMS[telemetry.BATCH_IMAGES.name].labels(self.model_name).observe(figures.images)
        HISTOGRAMS[telemetry.BATCH_REQUESTS.name].labels(self.model_name).observe(figures.requests)
        COUNTERS[telemetry.BAD_IMAGES.name].labels(self.model_name).inc(figures.bad_images)

    def rejected(self, count: int) -> None:
        COUNTERS[telemetry.REJECTED.name].labels(self.model_name).inc(count)

    def refused(self, spec: MetricSpec, count: int) -> None:
        COUNTERS[spec.name].labels(self.model_name).inc(count)

    def queue(self, requests: int, images: int) -> None:
        GAUGES[telemetry.QUEUED_REQUESTS.name].labels(self.model_name).set(requests)
        GAUGES[telemetry.QUEUED_IMAGES.name].labels(self.model_name).set(images)


class RequestRejected(InvalidInput):
    """A request answered with its own 4xx: over REST the JSON error body of the TorchServe door
    (``rejected_response``), over gRPC INVALID_ARGUMENT with that body as the message."""

    def __init__(self, error: RequestError) -> None:
        super().__init__(json.dumps(error.as_json()))
        self.error = error


class BatchFailed(RuntimeError):
    """A request whose batch failed on the server (500 ``internal_error`` from the batcher): over
    REST the same JSON error body with status 500, over gRPC INTERNAL (KServe's answer to an
    exception that is none of its own)."""

    def __init__(self, error: RequestError) -> None:
        super().__init__(str(error))
        self.error = error


class RequestNotRun(GrpcException):
    """A request the door did not run: 503 (its queue is full, or it drains; with Retry-After)
    or 504 (its deadline passed first). Over REST our JSON error body; over gRPC UNAVAILABLE or
    DEADLINE_EXCEEDED, as gRPC clients and their retry policies expect, the message saying when
    to retry."""

    def __init__(self, error: RequestError) -> None:
        code = StatusCode.DEADLINE_EXCEEDED if error.status == 504 else StatusCode.UNAVAILABLE
        super().__init__(json.dumps(error.as_json()), code)
        self.error = error


async def rejected_response(_request: Any, exc: RequestRejected | BatchFailed | RequestNotRun) -> JSONResponse:
    reply = error_reply(exc.error)
    return JSONResponse(reply.document, status_code=exc.error.status, headers=dict(reply.headers))


def grpc_headers(context: Any) -> dict[str, str]:
    """KServe's gRPC metadata-to-headers, plus the call's deadline as the transport's timeout
    (``TRANSPORT_TIMEOUT_HEADER``): gRPC consumes the client's ``grpc-timeout`` itself, and only
    the call's context tells how long the client still waits. (KServe's servicer calls this for
    every ModelInfer.)"""
    headers = _kserve_grpc_headers(context)
    remaining = context.time_remaining() if hasattr(context, "time_remaining") else None
    if remaining is not None:
        # The 504 must reach the client before its deadline (else gRPC cancels the call and the
        # client learns nothing, and a loaded event loop can be late by tens of ms): it leaves
        # early, a quarter of the time left, at most 250 ms. A request whose batch has not started
        # by then would not be answered in time anyway.
        # Its own field: a request may also set parameters.timeout; the earliest applies.
        remaining_ms = remaining * 1000.0
        early_ms = max(remaining_ms - min(GRPC_ANSWER_MARGIN_MS, remaining_ms / 4), 0.001)
        headers[TRANSPORT_TIMEOUT_HEADER] = f"{early_ms:.3f}"
    return headers


_kserve_grpc_headers = grpc_servicer.to_headers


class ImageDataPlane(DataPlane):
    """KServe's data plane, but a REST v2 body that arrives as bytes keeps its BYTES elements as
    bytes (images), a JSON body sent without a Content-Type is read as JSON, and the readiness
    check KServe makes before each REST inference asks only whether the model can serve: while
    the door sheds load or drains (readiness false), the door answers the request itself, with
    its own 503 and Retry-After (KServe's would be a bare "not ready")."""

    async def model_ready(self, model_name: str, disable_predictor_health_check: bool = False) -> bool:
        # KServe's inference routes pass True; its readiness routes (/v1/models/NAME,
        # /v2/models/NAME/ready, gRPC ModelReady) the default.
        model = self._model_registry.get_model(model_name)
        if disable_predictor_health_check and isinstance(model, ImageClassifierModel):
            return await model.serves()
        return await super().model_ready(model_name, disable_predictor_health_check)

    def decode_inference_request(self, body: Any, headers: dict, model_name: str) -> InferRequest:
        if not isinstance(body, (bytes, bytearray)):
            return super().decode_inference_request(body, headers, model_name)
        length = {k.lower(): v for k, v in (headers or {}).items()}.get(kserve_v2.HEADER_LENGTH.lower())
        try:
            return binary_infer_request(body, length if length is not None else len(body), model_name)
        except RequestError as error:
            raise RequestRejected(error) from None


def binary_infer_request(body: bytes | bytearray, header_length: int | str, model_name: str) -> InferRequest:
    """KServe's InferRequest for a REST body (binary tensor data after a JSON header, or JSON
    alone), its BYTES elements left as bytes: the inputs as sent, for ``parse_request``."""
    header, tensors = kserve_v2.split_binary(body, header_length)
    inputs = []
    for tensor, elements in tensors:
        parameters = {k: v for k, v in (tensor.get("parameters") or {}).items() if k != "binary_data_size"}
        data = elements if elements is not None else tensor.get("data")
        inputs.append(InferInput(name=str(tensor.get("name", INPUT)), shape=tensor.get("shape") or [len(data or [])],
                                 datatype=str(tensor.get("datatype", "BYTES")), data=data, parameters=parameters))
    outputs = header.get("outputs")
    requested = [RequestedOutput(name=o.get("name"), parameters=o.get("parameters")) for o in outputs
                 if isinstance(o, dict)] if isinstance(outputs, list) and outputs else None
    return InferRequest(model_name=model_name, infer_inputs=inputs, request_id=header.get("id"),
                        parameters=header.get("parameters"), request_outputs=requested)


@dataclass
class Exchange:
    """One request through KServe's hooks: what ``preprocess`` decoded, what ``predict`` found."""

    request: ParsedRequest
    infer_request: InferRequest | None  # set when KServe decoded a v2 request (answered with an InferResponse)
    received: float = 0.0  # time.monotonic() when preprocess got it: its timeout counts from here
    predictions: list[Prediction] = field(default_factory=list)


def infer_response(document: dict[str, Any], request: InferRequest) -> InferResponse:
    """Our v2 answer (``kserve_v2.V2Encoder``'s document) as KServe's InferResponse, which
    KServe sends over REST (JSON or binary, as the request asked) or gRPC."""
    outputs = [InferOutput(name=o["name"], shape=o["shape"], datatype=o["datatype"], data=o["data"])
               for o in document["outputs"]]
    return InferResponse(response_id=document.get("id") or str(uuid.uuid4()), model_name=document["model_name"],
                         infer_outputs=outputs, use_binary_outputs=request.use_binary_outputs,
                         requested_outputs=request.request_outputs)


class ImageClassifierModel(Model):
    """One model behind KServe's protocols, its hooks the serving loop's steps as KServe means
    them: ``preprocess`` decodes the request, ``predict`` classifies its images in a batch shared
    with concurrent requests, ``postprocess`` answers in the request's format; a failure leaves as
    the exception KServe answers with the request's status and our JSON error body."""

    def __init__(self, name: str, model_dir: Path, *, device: str = "auto", max_batch_delay_s: float = 0.005) -> None:
        super().__init__(name)
        self.model_dir = model_dir
        self.device = device
        self.max_batch_delay_s = max_batch_delay_s
        self.ready: bool = False
        self.loop: ServingLoop | None = None

    def load(self) -> bool:
        """Start the model once. KServe calls this again for a model whose health check fails: a
        second classifier would only leak the first's workers and memory, so it is not made."""
        if self.loop is not None:
            return bool(self.ready)
        classifier = ImageClassifier.for_serving(self.model_dir, device=self.device)
        self.loop = ServingLoop(classifier, self.name, PrometheusMetrics(self.name),
                                max_batch_delay_s=self.max_batch_delay_s)
        self.ready = True
        log.info("model %s ready on %s (batch %d images, delay %.1f ms)", self.name, classifier.device,
                 classifier.config.batch_size, self.max_batch_delay_s * 1000)
        return self.ready

    async def healthy(self) -> bool:
        """Readiness (``/v2/models/NAME/ready``, gRPC ModelReady; KServe also asks before each
        inference, and then serves it anyway): loaded, neither shedding load nor draining, and
        the model healthy. Off the event loop: replacing a dead loader worker forks."""
        if self.loop is None or not self.loop.ready:
            return False
        return await self.serves()

    async def serves(self) -> bool:
        """Whether the model can serve a request now: loaded and healthy, load or drain aside."""
        if not self.ready or self.loop is None:
            return False
        return await asyncio.to_thread(self.loop.healthy)

    @property
    def classifier(self) -> ImageClassifier:
        return self._loop().classifier

    def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> Exchange:
        """v2 (an InferRequest, REST or gRPC), v1 / any JSON body, or a raw body -> its images
        and parameters (from the body, or the headers: ``X-Top-K``, ``X-Request-Timeout-Ms``)."""
        received = time.monotonic()
        loop = self._loop()
        try:
            parsed = loop.parse(payload, {k.lower(): v for k, v in (headers or {}).items()})
        except RequestError as error:
            raise self._failed(error) from None
        return Exchange(parsed, payload if isinstance(payload, InferRequest) else None, received)

    def validate(self, payload: Any) -> Any:
        return payload  # the loop's parse has checked it

    async def predict(self, payload: Exchange, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> Exchange:
        outcome = await self._loop().classify(payload.request, payload.received)
        if isinstance(outcome, RequestError):
            raise self._failed(outcome)
        payload.predictions = outcome
        return payload

    def postprocess(self, result: Exchange, headers: dict[str, str] | None = None,
                    response_headers: dict[str, str] | None = None) -> Any:
        document = self._loop().encode(result.request, result.predictions).reply.document
        if result.infer_request is not None:
            return infer_response(document, result.infer_request)
        return document

    def _failed(self, error: RequestError) -> RequestRejected | BatchFailed | RequestNotRun:
        """The exception KServe answers ``error`` with (the loop counts it)."""
        self._loop().refuse(error)
        if error.not_run:
            return RequestNotRun(error)
        return BatchFailed(error) if error.status >= 500 else RequestRejected(error)

    def _loop(self) -> ServingLoop:
        assert self.loop is not None, "load() has not run"
        return self.loop

    def get_input_types(self) -> list[dict]:
        return [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": kserve_v2.OUTPUT, "datatype": "BYTES", "shape": [-1]}]

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.close()


class DrainingModelServer(ModelServer):
    """KServe's model server, but SIGTERM / SIGINT drain first (``drain``); a second signal
    stops at once. KServe's REST server is uvicorn, whose own signal handlers replace KServe's
    while it serves: the drain goes in front of uvicorn's."""

    def __init__(self, model: ImageClassifierModel, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self._draining: asyncio.Task[None] | None = None

    def register_signal_handler(self) -> None:
        super().register_signal_handler()
        rest = getattr(getattr(self, "_rest_server", None), "_server", None)
        if rest is None:  # no single-process uvicorn server: nothing to drain in front of
            return
        stop_now = rest.handle_exit

        def handle_exit(sig: int, frame: Any) -> None:
            if self._draining is not None:  # a second signal: stop now, the drain abandoned
                self._draining.cancel()
                rest.force_exit = True
                stop_now(sig, frame)
                return
            loop = asyncio.get_running_loop()
            self.model._loop().start_draining()
            self._draining = loop.create_task(self.drain_then(lambda: stop_now(sig, None)))

        rest.handle_exit = handle_exit  # read by uvicorn when it installs its handlers

    async def drain_then(self, stop: Any) -> None:
        """Admitted requests answered (or ``drain_timeout_s`` spent), then ``stop``: uvicorn's
        graceful exit, after which KServe stops gRPC and unloads the model."""
        loop = self.model._loop()
        drained = await loop.drained()
        log.info("drained (%s); stopping the servers", "every admitted request answered" if drained
                 else f"timed out after {loop.drain_timeout_s:g} s")
        stop()


def main() -> None:
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser], description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # --model_name, --http_port, --grpc_port and the rest are KServe's own (kserve.model_server.parser).
    parser.add_argument("--model_dir", type=Path, default=Path("/mnt/models"),
                        help="a model directory or a .mar, or a directory holding one .mar (KServe's mount)")
    parser.add_argument("--max_batch_delay_ms", type=float, default=5.0,
                        help="how long a request may wait for others to share its batch")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    args = parser.parse_args()
    if args.max_batch_delay_ms < 0:
        parser.error("--max_batch_delay_ms must be >= 0")
    model = ImageClassifierModel(args.model_name, args.model_dir, device=args.device,
                                 max_batch_delay_s=args.max_batch_delay_ms / 1000)
    server = DrainingModelServer(model, http_port=args.http_port, grpc_port=args.grpc_port, workers=1)
    # KServe configures its own loggers only (in ModelServer): the handler's (the compile
    # decision, the model ready) go to the same stream in the same format.
    ours = logging.getLogger("handler")
    ours.handlers, ours.propagate = list(kserve.logging.logger.handlers), False
    ours.setLevel(logging.INFO)
    model.load()
    server.dataplane = ImageDataPlane(model_registry=server.registered_models)
    for error_type in (RequestRejected, BatchFailed, RequestNotRun):
        kserve.model_server.app.add_exception_handler(error_type, rejected_response)
    grpc_servicer.to_headers = grpc_headers  # the gRPC deadline reaches the model as a timeout
    server.start([model])


if __name__ == "__main__":
    main()
