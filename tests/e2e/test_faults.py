"""Faults: a killed backend worker, a killed DataLoader worker, a full job queue."""

import concurrent.futures as futures
import os
import signal
import threading
import time

import psutil
import pytest
import requests

from harness.ts_server import start_server
from helpers import load_command, shape_image

loadtest = load_command("scripts/loadtest.py")
Target, prepare, run = loadtest.Target, loadtest.prepare, loadtest.run

pytestmark = pytest.mark.e2e
JOB_QUEUE = 4


@pytest.fixture(scope="module")
def fault_server(model_store, tmp_path_factory):
    """A server of its own: these tests kill its processes and fill its queue."""
    workdir = tmp_path_factory.mktemp("faults")
    instance = start_server(workdir, model_store, ["shapes.mar"], extra_config=f"job_queue_size={JOB_QUEUE}\n")
    try:
        yield instance
    finally:
        instance.stop()


def backend_pid(server) -> int:
    workers = server.ready_workers("shapes")
    assert workers, "no READY worker"
    return int(workers[0]["pid"])


def wait_ready(server, replaced_pid: int, timeout_s: float = 120) -> float:
    """Seconds until a READY worker other than ``replaced_pid`` serves the model."""
    start = time.time()
    while time.time() - start < timeout_s:
        try:
            if any(int(w["pid"]) != replaced_pid for w in server.ready_workers("shapes")):
                return time.time() - start
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no READY worker {timeout_s} s after the fault")


def good_request(server, seed: int = 0) -> requests.Response:
    images = [shape_image(label, seed + i) for i, label in enumerate(["circle", "square", "triangle"])]
    return server.predict(files=[(f"f{i}", d) for i, d in enumerate(images)])


def test_killed_backend_worker_fails_only_in_flight_requests_and_recovers(fault_server):
    target = Target(fault_server.inference_url, "shapes", fault_server.keys()["inference"])
    prepared = prepare(target)  # references first, while the worker is healthy
    reports = {}
    load = threading.Thread(
        target=lambda: reports.update(run(target, clients=2, seconds=12, max_batch=16, prepared=prepared))
    )
    load.start()
    time.sleep(3)  # the load is running
    victim = backend_pid(fault_server)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    recovery_s = wait_ready(fault_server, victim)
    load.join(timeout=120)
    assert not load.is_alive(), "the load hung after the worker was killed"
    report = reports
    print(f"worker {victim} killed; READY again after {recovery_s:.1f} s; load report: {report}")
    assert report["mismatches"] == 0, report
    # Only requests in flight on the dead worker (and queued for it meanwhile) may fail, with a 5xx.
    assert all(code.startswith("5") for code in report["errors"]), report
    assert sum(report["errors"].values()) <= 10, report
    assert backend_pid(fault_server) != victim
    for i in range(5):
        assert good_request(fault_server, 20 + i).status_code == 200
    assert time.time() - killed_at < 120


def test_killed_loader_worker_is_replaced(fault_server):
    assert good_request(fault_server).status_code == 200
    backend = psutil.Process(backend_pid(fault_server))
    loader_workers = backend.children()
    assert loader_workers, "the backend worker has no DataLoader workers"
    victim = loader_workers[0]
    victim.kill()
    deadline = time.time() + 10
    while victim.is_running() and victim.status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
        time.sleep(0.1)  # the backend, its parent, reaps it
    for i in range(3):
        response = good_request(fault_server, 40 + i)
        assert response.status_code == 200, response.text
    assert backend.is_running(), "the backend worker died with its loader worker"
    alive = [p.pid for p in backend.children() if p.status() != psutil.STATUS_ZOMBIE]
    assert victim.pid not in alive and len(alive) == len(loader_workers), (alive, victim.pid)


def test_full_job_queue_answers_503_and_recovers(fault_server):
    """TorchServe's frontend owns the queue (job_queue_size): past it, its own 503 at once, no
    Retry-After (docs/production.md). Its depth is the management API's jobQueueStatus."""
    images = [shape_image("square", 60 + i) for i in range(16)]
    files = [(f"f{i}", d) for i, d in enumerate(images)]
    depths, stop = [], threading.Event()

    def watch_queue():
        while not stop.is_set():
            status = fault_server.manage("GET", "/models/shapes").json()[0]["jobQueueStatus"]
            depths.append((status["pendingRequests"], status["remainingCapacity"]))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch_queue)
    watcher.start()
    with futures.ThreadPoolExecutor(32) as pool:
        burst = list(pool.map(lambda _: fault_server.predict(files=files), range(32)))  # a hang fails here
    stop.set()
    watcher.join(60)
    codes = [r.status_code for r in burst]
    assert 503 in codes, codes
    assert set(codes) <= {200, 503}, codes
    refused = next(r for r in burst if r.status_code == 503)
    assert refused.json()["code"] == 503 and refused.json()["type"] == "ServiceUnavailableException", refused.text
    assert "Retry-After" not in refused.headers  # TorchServe's, not the handler's: none to give
    # Two counters read one after the other, during a burst: each pair within one of the bound.
    assert all(abs(pending + free - JOB_QUEUE) <= 1 for pending, free in depths), depths
    assert max(pending for pending, _ in depths) > 0, depths  # the queue depth was visible
    for i in range(3):
        assert good_request(fault_server, 80 + i).status_code == 200
