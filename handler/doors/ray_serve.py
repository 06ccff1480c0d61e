"""The Ray Serve door: a Serve application over the core classifier, for more than one machine.

    serve start --http-host 127.0.0.1 --http-port 8000 --proxy-location HeadOnly   # once per cluster
    serve run handler.doors.ray_serve:app model=DIR_OR_MAR [name=NAME] [num_replicas=N] [num_cpus=C]
              [num_gpus=G] [max_batch_delay_ms=5] [device=auto] [max_ongoing_requests=M] [max_queued_requests=Q]
              [min_replicas=A max_replicas=B [target_ongoing_requests=T]]   # autoscaling instead of N

``app`` is an application builder (Serve passes it the ``key=value`` arguments); ``name`` defaults
to the model directory's or archive's name. Each replica is one ``ImageClassifier`` (its own loader
workers), placed by Ray on whichever node has the CPUs (and GPUs) it asks for; the model path
must be readable on every node. The URL paths are the TorchServe door's:

    POST /predictions/NAME            raw body, multipart (form upload or mixed), JSON images
    POST /v1/models/NAME:predict      KServe v1 {"instances": [...]}
    POST /v2/models/NAME/infer        Open Inference Protocol, JSON or binary tensor data
    GET  /ping                        {"status": "Healthy"}

Each request goes through the serving loop (``handler.serving``): decoded, answered by the
request's own encoder, with the same bodies and per-request 4xx errors as the other doors.
Concurrent requests to a replica share batches counted in **images** (the loop's batcher, not
``@serve.batch``, which counts calls and fails a whole batch on one exception): a bad request fails
alone, and a failed batch answers its requests with a 500. A replica whose model is unhealthy (a
loader worker died) says so to Ray's health check (``check_health``), and Ray replaces it. The
metrics (``handler.telemetry``) go to Ray's metrics (Prometheus), the queue depth included.

Production traffic (``handler.serving``): a request past the replica's ``max_queued_images`` is
answered 503 ``overloaded`` with ``Retry-After`` (and one past Ray's own proxy queue,
``max_queued_requests``, 503 with ``Retry-After`` from Ray); a request's timeout (``X-Request-Timeout-Ms``,
v2 ``parameters.timeout``) counts from its arrival at the replica, and one that expires before
its batch runs is a 504. A replica being stopped (scale-down, redeploy, ``serve shutdown``) gets
no new requests from Ray's router, and has ``drain_timeout_s`` (the deployment's
``graceful_shutdown_timeout_s``) to finish the admitted ones. Each replica's torch (and
OpenVINO) threads are its ``num_cpus``, so replicas sharing a node do not oversubscribe it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig
from ray.serve.metrics import Counter, Gauge, Histogram
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from handler import telemetry
from handler.classifier import ImageClassifier
from handler.devices import threads_for_cpus
from handler.doors.ray_routing import ROUTER_PATH
from handler.errors import RequestError
from handler.model.files import read_model
from handler.serving import Answer, ServingLoop
from handler.telemetry import BatchFigures, MetricSpec

log = logging.getLogger(__name__)


class RayMetrics:
    """The METRICS (``handler.telemetry``) into Ray Serve's metrics, tagged with the model's name."""

    def __init__(self, model_name: str) -> None:
        self.tags = {"model_name": model_name}
        self.histograms = {spec.name: Histogram(spec.name, spec.help, boundaries=[float(b) for b in spec.buckets],
                                                tag_keys=_tag_keys(spec))
                           for spec in telemetry.METRICS if spec.kind == "histogram"}
        self.counters = {spec.name: Counter(spec.name, spec.help, tag_keys=_tag_keys(spec))
                         for spec in telemetry.METRICS if spec.kind == "counter"}
        self.gauges = {spec.name: Gauge(spec.name, spec.help, tag_keys=_tag_keys(spec))
                       for spec in telemetry.METRICS if spec.kind == "gauge"}

    def batch(self, figures: BatchFigures) -> None:
        for stage, ms in figures.timings.items():
            self.histograms[telemetry.STAGE_MS.name].observe(ms, tags={**self.tags, "stage": stage})
        self.histograms[telemetry.BATCH_IMAGES.name].observe(figures.images, tags=self.tags)
        self.histograms[telemetry.BATCH_REQUESTS.name].observe(figures.requests, tags=self.tags)
        if figures.bad_images:
            self.counters[telemetry.BAD_IMAGES.name].inc(figures.bad_images, tags=self.tags)

    def rejected(self, count: int) -> None:
        if count:
            self.counters[telemetry.REJECTED.name].inc(count, tags=self.tags)

    def refused(self, spec: MetricSpec, count: int) -> None:
        if count:
            self.counters[spec.name].inc(count, tags=self.tags)

    def queue(self, requests: int, images: int) -> None:
        self.gauges[telemetry.QUEUED_REQUESTS.name].set(requests, tags=self.tags)
        self.gauges[telemetry.QUEUED_IMAGES.name].set(images, tags=self.tags)


def _tag_keys(spec: MetricSpec) -> Any:  # Ray's annotation says a one-tuple; any tuple of names works
    return ("model_name", *spec.labels)


class ImageClassifierDeployment:
    """One replica: the serving loop behind the TorchServe door's URL paths."""

    def __init__(self, model: str, name: str, *, device: str = "auto", max_batch_delay_ms: float = 5.0,
                 num_cpus: float = 1.0) -> None:
        if max_batch_delay_ms < 0:
            raise ValueError(f"max_batch_delay_ms must be >= 0, got {max_batch_delay_ms}")
        self.name = name
        self.threads = threads_for_cpus(num_cpus)
        classifier = ImageClassifier.for_serving(model, device=device, overrides={"intra_op_threads": self.threads})
        self.loop = ServingLoop(classifier, name, RayMetrics(name), max_batch_delay_s=max_batch_delay_ms / 1000)
        self._routes = {f"/predictions/{name}", f"/v1/models/{name}:predict", f"/v2/models/{name}/infer"}
        self.served = 0  # requests answered 200
        log.info("ray serve replica of %s ready on %s with %d threads", name, classifier.device, self.threads)

    async def __call__(self, request: Request) -> Response:
        received = time.monotonic()
        path = request.url.path
        if request.method == "GET" and path in ("/ping", "/ping/"):
            return JSONResponse({"status": "Healthy"})
        if path not in self._routes:
            # A wrong address, not a rejected request: not counted as one.
            return self._send(self.loop.refuse(RequestError(
                "not_found", f"no route {request.method} {path}; POST to one of {sorted(self._routes)}"), count=False))
        if request.method != "POST":
            return self._send(self.loop.refuse(RequestError("method_not_allowed", f"{path} takes POST"), count=False))
        headers = {key.lower(): value for key, value in request.headers.items()}
        answer = await self.loop.serve(await request.body(), headers, received)
        if answer.status == 200:
            self.served += 1
        return self._send(answer)

    def info(self) -> dict[str, Any]:
        """What this replica is and runs with (a handle call, for operators and tests): its
        process and node, torch threads, requests served, its queue."""
        import ray
        import torch

        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "threads": torch.get_num_threads(),
                "served": self.served, "queued_requests": self.loop.queued_requests,
                "queued_images": self.loop.queued_images, "ready": self.loop.ready}

    def check_health(self) -> None:
        """Raises while the model is unhealthy (a loader worker died): Ray then replaces this
        replica."""
        if not self.loop.healthy():
            raise RuntimeError(f"model {self.name} is unhealthy: an image loader worker died")

    @staticmethod
    def _send(answer: Answer) -> Response:
        reply = answer.reply
        return Response(reply.body, status_code=answer.status, media_type=reply.content_type,
                        headers=dict(reply.headers))

    def __del__(self) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.close()


def model_name(model: str | Path) -> str:
    """The name a model is served under by default: its directory's or archive's name."""
    path = Path(model)
    return path.stem if path.suffix == ".mar" else path.name


def app(args: dict[str, Any]) -> Application:
    """The application ``serve run handler.doors.ray_serve:app model=... [name=...] [num_replicas=...]``
    builds (``num_cpus`` / ``num_gpus`` per replica, ``max_batch_delay_ms``, ``device``,
    ``max_ongoing_requests``: requests Ray hands one replica at once, default twice the model's
    batch size; ``max_queued_requests``: requests a proxy queues when every replica is full,
    default twice that, past which Ray answers 503 with Retry-After; ``min_replicas`` /
    ``max_replicas`` / ``target_ongoing_requests``: Ray Serve autoscaling on the requests each
    replica holds)."""
    unknown = set(args) - {"model", "name", "num_replicas", "num_cpus", "num_gpus", "max_batch_delay_ms", "device",
                           "max_ongoing_requests", "max_queued_requests", "min_replicas", "max_replicas",
                           "target_ongoing_requests"}
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)}; see handler/doors/ray_serve.py")
    if "model" not in args:
        raise ValueError("model=DIR_OR_MAR is required")
    model = str(args["model"])
    if not Path(model).exists():
        raise ValueError(f"model {model!r} does not exist")
    name = str(args.get("name") or model_name(model))
    config = read_model(model).config
    num_cpus = float(args.get("num_cpus", 1))
    max_ongoing = int(args.get("max_ongoing_requests", 2 * config.batch_size))
    replicas: dict[str, Any] = {"num_replicas": int(args.get("num_replicas", 1))}
    if "min_replicas" in args or "max_replicas" in args:
        if "num_replicas" in args:
            raise ValueError("give num_replicas, or min_replicas and max_replicas (autoscaling), not both")
        replicas = {"autoscaling_config": {
            "min_replicas": int(args.get("min_replicas", 1)), "max_replicas": int(args.get("max_replicas", 1)),
            # Requests per replica Ray aims at (requests, not images: of the 30+ image requests
            # this door is made for, 2 are about two model batches).
            "target_ongoing_requests": float(args.get("target_ongoing_requests", 2))}}
    deployment = serve.deployment(
        name=name, **replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": float(args.get("num_gpus", 0))},
        health_check_period_s=5,
        # Requests a replica holds at once: enough to fill its next batch while one runs, even of
        # one-image requests; within them the replica's own max_queued_images bound answers 503
        # with Retry-After and the JSON error.
        max_ongoing_requests=max_ongoing,
        # The less busy replica, on any node (Ray's default prefers the proxy's own node).
        request_router_config={"request_router_class": ROUTER_PATH},
        # Requests a proxy (or handle) queues while every replica is full: past it Ray answers
        # 503 itself (text body) with a Retry-After, instead of a queue that grows without bound.
        max_queued_requests=int(args.get("max_queued_requests", 2 * max_ongoing)),
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
        # A replica being stopped finishes the requests it admitted (drain).
        graceful_shutdown_timeout_s=config.drain_timeout_s,
    )(ImageClassifierDeployment)
    return deployment.bind(model, name, device=str(args.get("device", "auto")),
                           max_batch_delay_ms=float(args.get("max_batch_delay_ms", 5.0)), num_cpus=num_cpus)
