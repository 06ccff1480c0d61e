"""The Ray Serve door: a Serve application over the core classifier, for more than one machine.

    serve start --http-host 127.0.0.1 --http-port 8000 --proxy-location HeadOnly   # once per cluster
    serve run handler.doors.ray_serve:app model=DIR_OR_MAR [name=NAME] [num_replicas=N] [num_cpus=C]
              [num_gpus=G] [max_batch_delay_ms=5] [device=auto]

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
metrics (``handler.telemetry``) go to Ray's metrics (Prometheus).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.metrics import Counter, Histogram
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from handler import telemetry
from handler.classifier import ImageClassifier
from handler.errors import RequestError
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


def _tag_keys(spec: MetricSpec) -> Any:  # Ray's annotation says a one-tuple; any tuple of names works
    return ("model_name", *spec.labels)


class ImageClassifierDeployment:
    """One replica: the serving loop behind the TorchServe door's URL paths."""

    def __init__(self, model: str, name: str, *, device: str = "auto", max_batch_delay_ms: float = 5.0) -> None:
        if max_batch_delay_ms < 0:
            raise ValueError(f"max_batch_delay_ms must be >= 0, got {max_batch_delay_ms}")
        self.name = name
        classifier = ImageClassifier.for_serving(model, device=device)
        self.loop = ServingLoop(classifier, name, RayMetrics(name), max_batch_delay_s=max_batch_delay_ms / 1000)
        self._routes = {f"/predictions/{name}", f"/v1/models/{name}:predict", f"/v2/models/{name}/infer"}
        log.info("ray serve replica of %s ready on %s", name, classifier.device)

    async def __call__(self, request: Request) -> Response:
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
        return self._send(await self.loop.serve(await request.body(), headers))

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
    builds (``num_cpus`` / ``num_gpus`` per replica, ``max_batch_delay_ms``, ``device``)."""
    unknown = set(args) - {"model", "name", "num_replicas", "num_cpus", "num_gpus", "max_batch_delay_ms", "device"}
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)}; see handler/doors/ray_serve.py")
    if "model" not in args:
        raise ValueError("model=DIR_OR_MAR is required")
    model = str(args["model"])
    if not Path(model).exists():
        raise ValueError(f"model {model!r} does not exist")
    name = str(args.get("name") or model_name(model))
    deployment = serve.deployment(
        name=name, num_replicas=int(args.get("num_replicas", 1)),
        ray_actor_options={"num_cpus": float(args.get("num_cpus", 1)), "num_gpus": float(args.get("num_gpus", 0))},
        health_check_period_s=5,
    )(ImageClassifierDeployment)
    return deployment.bind(model, name, device=str(args.get("device", "auto")),
                           max_batch_delay_ms=float(args.get("max_batch_delay_ms", 5.0)))
