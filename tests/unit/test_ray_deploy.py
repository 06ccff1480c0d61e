"""handler.doors.ray_serve's application builder and the shipped `serve deploy` configs (no cluster:
binding an application starts nothing)."""

from pathlib import Path

import pytest
import yaml

from handler.doors.ray_serve import ImageClassifierDeployment, app, model_name
from harness.ts_server import ROOT

CONFIGS = sorted((ROOT / "deploy" / "ray").glob("*.yaml"))


def test_the_builder_names_the_deployment_after_the_model_and_takes_the_contract_arguments():
    application = app({"model": str(ROOT / "models" / "shapes"), "num_replicas": "2", "num_cpus": "1"})
    deployment = application._bound_deployment
    assert deployment.name == "shapes" and deployment.num_replicas == 2
    assert deployment.func_or_class is ImageClassifierDeployment
    assert deployment.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0.0}
    named = app({"model": str(ROOT / "models" / "shapes"), "name": "demo"})._bound_deployment
    assert named.name == "demo"
    assert model_name("/models/efficientnet_lite0.mar") == "efficientnet_lite0"
    assert model_name(Path("models/shapes")) == "shapes"


@pytest.mark.parametrize("args, message", [
    pytest.param({}, "model=DIR_OR_MAR is required", id="no-model"),
    pytest.param({"model": "/nowhere/x.mar"}, "does not exist", id="missing-model"),
    pytest.param({"model": str(ROOT / "models" / "shapes"), "replicas": "2"}, "unknown arguments", id="typo"),
])
def test_bad_builder_arguments_are_clear_errors(args, message):
    with pytest.raises(ValueError, match=message):
        app(args)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_serve_configs_build_with_this_builder(path):
    (application,) = yaml.safe_load(path.read_text())["applications"]
    assert application["import_path"] == "handler.doors.ray_serve:app"
    args = {**application["args"], "model": str(ROOT / "models" / "efficientnet_lite0")}
    deployment = app(args)._bound_deployment
    assert [d["name"] for d in application["deployments"]] == [deployment.name] == ["efficientnet_lite0"]
    options = deployment.ray_actor_options
    assert options["num_cpus"] == float(application["args"]["num_cpus"])
    assert options["num_gpus"] == float(application["args"].get("num_gpus", 0))


def test_both_configs_are_shipped():
    assert [p.name for p in CONFIGS] == ["serve-cpu.yaml", "serve-gpu.yaml"]


def test_rays_health_check_asks_the_models_health():
    """Ray calls check_health on each replica; it answers from the same call as every door's
    probe (ServingLoop.healthy, which replaces a dead loader worker first) and raises when the
    model cannot serve, so that Ray replaces the replica."""
    from types import SimpleNamespace

    replica = object.__new__(ImageClassifierDeployment)
    replica.name = "shapes"
    asked = []
    replica.loop = SimpleNamespace(healthy=lambda: asked.append(1) or True, close=lambda: None)
    replica.check_health()
    replica.loop = SimpleNamespace(healthy=lambda: asked.append(1) or False, close=lambda: None)
    with pytest.raises(RuntimeError, match="model shapes is unhealthy"):
        replica.check_health()
    assert len(asked) == 2


def test_the_builder_sets_the_drain_the_replica_queue_and_autoscaling_from_the_model():
    """A replica holds two batches' worth of requests (its own max_queued_images answers 503 with
    Retry-After past it; Ray's proxy queue is bounded too, with a Retry-After), drain_timeout_s to
    drain when Ray stops it, and threads = num_cpus."""
    from handler.devices import threads_for_cpus
    from handler.model.files import read_model

    shapes = str(ROOT / "models" / "shapes")
    config = read_model(shapes).config
    deployment = app({"model": shapes, "num_cpus": "2"})._bound_deployment
    assert deployment._deployment_config.max_ongoing_requests == 2 * config.batch_size
    assert deployment._deployment_config.max_queued_requests == 4 * config.batch_size
    assert deployment._deployment_config.backpressure_config.retry_after_s == 1
    assert deployment._deployment_config.graceful_shutdown_timeout_s == config.drain_timeout_s
    assert deployment.ray_actor_options["num_cpus"] == 2.0
    scaled = app({"model": shapes, "min_replicas": "1", "max_replicas": "4"})._bound_deployment
    autoscaling = scaled._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (1, 4, 2.0)
    with pytest.raises(ValueError, match="not both"):
        app({"model": shapes, "num_replicas": "2", "max_replicas": "4"})
    assert [threads_for_cpus(c) for c in (0.5, 1, 1.9, 4)] == [1, 1, 1, 4]
