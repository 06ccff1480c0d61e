"""The Ray Serve door: a Serve application over the core classifier, for more than one machine.

    serve start --http-host 127.0.0.1 --http-port 8000 --proxy-location HeadOnly   # once per cluster
    serve run handler.ray_serve:app model=DIR_OR_MAR [name=NAME] [num_replicas=N] [num_cpus=C]
              [num_gpus=G] [max_batch_delay_ms=5] [device=auto]

``app`` is an application builder (Serve passes it the ``key=value`` arguments); ``name`` defaults
to the model directory's or archive's name. Each replica is one ``ImageClassifier`` (its own loader
workers), placed by Ray on whichever node has the CPUs (and GPUs) it asks for; the model path
must be readable on every node. The URL paths are the TorchServe door's:

    POST /predictions/NAME            raw body, multipart (form upload or mixed), JSON images
    POST /v1/models/NAME:predict      KServe v1 {"instances": [...]}
    POST /v2/models/NAME/infer        Open Inference Protocol, JSON or binary tensor data
    GET  /ping                        {"status": "Healthy"}

Requests are decoded by ``handler.protocols.decode_request`` and answered by the request's own
encoder, with the same bodies and per-request 4xx errors as the other doors. Concurrent requests
to a replica share batches counted in **images** (``handler.batcher``, not ``@serve.batch``,
which counts calls and fails a whole batch on one exception): a bad request fails alone, and a
failed batch answers its requests with a 500. A replica whose loader workers died reports itself
unhealthy (``check_health``) and Ray replaces it. Stage timings go to Ray's metrics (Prometheus).
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

from handler.batcher import ImageBatcher
from handler.classifier import BatchResult, ImageClassifier
from handler.errors import RequestError
from handler.protocols import decode_request, error_reply

log = logging.getLogger(__name__)

STAGE_BOUNDARIES = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0]
# Ray's annotation says a one-tuple; any tuple of tag names works.
STAGE_TAGS: Any = ("model_name", "stage")


class ImageClassifierDeployment:
    """One replica: the core classifier behind the TorchServe door's URL paths."""

    def __init__(self, model: str, name: str, *, device: str = "auto", max_batch_delay_ms: float = 5.0) -> None:
        if max_batch_delay_ms < 0:
            raise ValueError(f"max_batch_delay_ms must be >= 0, got {max_batch_delay_ms}")
        self.name = name
        self.classifier = ImageClassifier.for_serving(model, device=device)
        config = self.classifier.config
        self.batcher = ImageBatcher(self.classifier.classify_requests, max_images=config.batch_size,
                                    max_delay_s=max_batch_delay_ms / 1000, on_batch=self._record)
        self._routes = {f"/predictions/{name}", f"/v1/models/{name}:predict", f"/v2/models/{name}/infer"}
        tags = ("model_name",)
        self._stage_ms = Histogram("image_classifier_stage_ms", "Milliseconds per stage of one batch",
                                   boundaries=STAGE_BOUNDARIES, tag_keys=STAGE_TAGS)
        self._batch_images = Histogram("image_classifier_batch_images", "Images per batch",
                                       boundaries=[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0], tag_keys=tags)
        self._bad_images = Counter("image_classifier_bad_images", "Images that could not be classified",
                                   tag_keys=tags)
        self._rejected = Counter("image_classifier_rejected_requests", "Requests answered with a 4xx",
                                 tag_keys=tags)
        log.info("ray serve replica of %s ready on %s", name, self.classifier.device)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if request.method == "GET" and path in ("/ping", "/ping/"):
            return JSONResponse({"status": "Healthy"})
        if path not in self._routes:
            return JSONResponse({"error": "not_found", "message": f"no route {request.method} {path}; POST to one of "
                                          f"{sorted(self._routes)}", "images": []}, status_code=404)
        if request.method != "POST":
            return JSONResponse({"error": "method_not_allowed", "message": f"{path} takes POST", "images": []},
                                status_code=405)
        headers = {key.lower(): value for key, value in request.headers.items()}
        try:
            parsed = decode_request(await request.body(), headers=headers,
                                    max_images=self.classifier.config.max_images_per_request)
        except RequestError as error:
            return self._error(error)
        outcome = await self.batcher.submit(parsed.images)
        if isinstance(outcome, RequestError):
            return self._error(outcome)
        reply = parsed.reply(outcome, self.name)
        return Response(reply.body, media_type=reply.content_type, headers=dict(reply.headers))

    def check_health(self) -> None:
        """Raises while a loader worker is dead: Ray then replaces this replica."""
        dead = self.classifier.pipeline.loader.workers.dead_workers()
        if dead:
            raise RuntimeError(f"image loader workers {dead} died")

    def _error(self, error: RequestError) -> Response:
        if error.status < 500:
            self._rejected.inc(tags={"model_name": self.name})
        reply = error_reply(error)
        return Response(reply.body, status_code=error.status, media_type=reply.content_type)

    def _record(self, result: BatchResult, requests: int) -> None:
        for stage, ms in result.timings.items():
            self._stage_ms.observe(ms, tags={"model_name": self.name, "stage": stage})
        self._batch_images.observe(result.images, tags={"model_name": self.name})
        if result.bad_images:
            self._bad_images.inc(result.bad_images, tags={"model_name": self.name})

    def __del__(self) -> None:
        batcher, classifier = getattr(self, "batcher", None), getattr(self, "classifier", None)
        if batcher is not None:
            batcher.close()
        if classifier is not None:
            classifier.close()


def model_name(model: str | Path) -> str:
    """The name a model is served under by default: its directory's or archive's name."""
    path = Path(model)
    return path.stem if path.suffix == ".mar" else path.name


def app(args: dict[str, Any]) -> Application:
    """The application ``serve run handler.ray_serve:app model=... [name=...] [num_replicas=...]``
    builds (``num_cpus`` / ``num_gpus`` per replica, ``max_batch_delay_ms``, ``device``)."""
    unknown = set(args) - {"model", "name", "num_replicas", "num_cpus", "num_gpus", "max_batch_delay_ms", "device"}
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)}; see handler/ray_serve.py")
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
