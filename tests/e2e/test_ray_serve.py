"""The Ray Serve door on a real two-node Ray cluster (two `ray start` processes on loopback, one
CPU each), started with Ray's own CLI (`serve start`, `serve run handler.doors.ray_serve:app ...`) and
called over HTTP like the TorchServe door: answers, production traffic (a flood past the bound,
deadlines, top_k per request, threads per replica), and faults (a loader worker killed, a node
killed, a replica stopped by a scale-down under load)."""

import base64
import concurrent.futures as futures
import json
import threading
import time

import numpy as np
import psutil
import pytest
import requests
import tritonclient.http as triton_http

from harness.wire import multipart_mixed

from handler.classifier import ImageClassifier
from helpers import assert_same_answers as same, demo_model_dir, shape_image
from harness.ray_cluster import HEAD_IP, RayCluster, free_port
from traffic_forms import b64 as to_b64, bad_top_k_requests, check_bad_top_k, first, top_k_forms

pytestmark = pytest.mark.e2e

NAME = "shapes"
LABELS = ["circle", "square", "triangle"]
BOUND = 64  # max_queued_images per replica


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The demo model, eager and with small batches (compiling would only lengthen the start)."""
    return demo_model_dir(tmp_path_factory.mktemp("ray_model") / NAME, compile=False, batch_size=8,
                          max_image_pixels=1_000_000, max_queued_images=BOUND)


@pytest.fixture(scope="module")
def serve_url(model_dir, tmp_path_factory):
    with RayCluster(nodes=2) as cluster:
        port = free_port()
        cluster.run(["serve", "start", f"--http-host={HEAD_IP}", f"--http-port={port}", "--proxy-location=HeadOnly"])
        deploy(cluster, model_dir, replicas=2)
        url = f"http://{HEAD_IP}:{port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                if requests.get(f"{url}/ping", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}/ping did not answer")
            time.sleep(2)
        wait_for_replicas(cluster, 2)
        yield url, cluster


def deploy(cluster, model_dir, replicas):
    cluster.run(["serve", "run", "--non-blocking", "handler.doors.ray_serve:app", f"model={model_dir}",
                 f"num_replicas={replicas}", "num_cpus=1"], timeout_s=300)


def driver(cluster, code):
    """Run ``code`` in a Ray driver connected to the cluster; the JSON it prints last."""
    script = f"import json, ray; from ray import serve; ray.init(address={cluster.address!r}, logging_level='ERROR')\n{code}"
    out = cluster.run(["python", "-c", script]).stdout.splitlines()
    return json.loads([line for line in out if line.startswith(("[", "{"))][-1])


def wait_for_replicas(cluster, count, timeout_s=300):
    """``serve status`` needs the dashboard (off here): ask the controller through a driver."""
    code = ("s = serve.status().applications['default'].deployments[%r]\n"
            "print(json.dumps({'status': str(s.status), 'running': s.replica_states.get('RUNNING', 0)}))" % NAME)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = driver(cluster, code)
        if state["status"].endswith("HEALTHY") and state["running"] == count:
            return
        time.sleep(2)
    raise TimeoutError(f"{count} replicas not running: {state}")


@pytest.fixture(scope="module")
def library(model_dir):
    with ImageClassifier.load(model_dir, device="cpu") as clf:
        yield clf


def images(n, seed):
    return [shape_image(LABELS[(seed + i) % 3], seed=seed + i) for i in range(n)]


def test_two_replicas_are_placed_on_different_nodes(serve_url):
    _, cluster = serve_url
    nodes = driver(cluster, "print(json.dumps(sorted(a['Address']['IPAddress'] for a in ray._private.state.actors()"
                            ".values() if a['State'] == 'ALIVE' and 'ServeReplica' in a['ActorClassName'])))")
    assert nodes == sorted(cluster.node_ips), nodes


def test_concurrent_clients_get_their_own_answers_equal_to_the_library(serve_url, library):
    url, _ = serve_url
    requests_ = [images(1 + i % 5, seed=10 * i) for i in range(16)]

    def send(batch):
        files = [(f"f{i}", (f"f{i}.png", data, "image/png")) for i, data in enumerate(batch)]
        response = requests.post(f"{url}/predictions/{NAME}", files=files, timeout=120)
        assert response.status_code == 200, response.text
        body = response.json()
        return body if isinstance(body, list) else [body]

    with futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, requests_))
    for batch, got in zip(requests_, answers):
        same(got, library.classify(batch))


def test_every_request_form_and_a_bad_request_failing_alone(serve_url, library):
    url, _ = serve_url
    batch = images(3, seed=99)
    want = library.classify(batch)
    b64 = [base64.b64encode(b).decode() for b in batch]
    raw = requests.post(f"{url}/predictions/{NAME}", data=batch[0], timeout=60)
    same([raw.json()], want[:1])
    listed = requests.post(f"{url}/predictions/{NAME}", json={"images": b64}, timeout=60).json()
    v1 = requests.post(f"{url}/v1/models/{NAME}:predict", json={"instances": [{"b64": b} for b in b64]},
                       timeout=60).json()["predictions"]
    v2 = requests.post(f"{url}/v2/models/{NAME}/infer", json={"id": "r1", "inputs": [
        {"name": "images", "shape": [3], "datatype": "BYTES", "data": b64}]}, timeout=60).json()
    assert v2["id"] == "r1" and v2["model_name"] == NAME
    for answer in (listed, v1, [json.loads(x) for x in v2["outputs"][0]["data"]]):
        same(answer, want)
    tensor = triton_http.InferInput("images", [3], "BYTES")  # tritonclient's binary tensor data
    tensor.set_data_from_numpy(np.array(batch, dtype=np.object_), binary_data=True)
    client = triton_http.InferenceServerClient(url.split("//", 1)[1])
    result = client.infer(NAME, [tensor], outputs=[triton_http.InferRequestedOutput("predictions", binary_data=True)])
    same([json.loads(x) for x in result.as_numpy("predictions")], want)
    body, content_type = multipart_mixed([(f"f{i}", (f"f{i}.png", d, "image/png")) for i, d in enumerate(batch)])
    mixed = requests.post(f"{url}/predictions/{NAME}", data=body, headers={"Content-Type": content_type}, timeout=60)
    same(mixed.json(), want)
    bad = requests.post(f"{url}/predictions/{NAME}", json={"images": [b64[0], base64.b64encode(b"nope").decode()]},
                        timeout=60)
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"] == "invalid_image" and bad.json()["images"][0]["index"] == 1
    assert requests.get(f"{url}/predictions/other", timeout=30).status_code == 404
    assert requests.post(f"{url}/predictions/{NAME}", data=batch[1], timeout=60).status_code == 200  # still serving


def test_stage_metrics_reach_rays_prometheus_endpoints(serve_url):
    url, cluster = serve_url
    requests.post(f"{url}/predictions/{NAME}", data=images(1, seed=3)[0], timeout=60).raise_for_status()
    deadline = time.monotonic() + 90
    while True:  # Ray's agents export what the replicas recorded every few seconds
        pages = [requests.get(f"http://{ip}:{port}/metrics", timeout=10).text
                 for ip, port in cluster.metrics_ports.items()]
        lines = [line for page in pages for line in page.splitlines() if "image_classifier_stage_ms_count" in line]
        if any('stage="InferenceMs"' in line and f'model_name="{NAME}"' in line for line in lines):
            break
        assert time.monotonic() < deadline, "no image_classifier_stage_ms in Ray's metrics"
        time.sleep(3)


# ---- production traffic ----------------------------------------------------------------------------


def replica_infos(cluster, calls=12):
    """{pid: info} of the replicas, from their ``info`` method called through a handle (calls are
    spread over the replicas: enough of them reach each)."""
    code = ("h = serve.get_deployment_handle(%r, app_name='default')\n"
            "print(json.dumps([h.info.remote().result() for _ in range(%d)]))" % (NAME, calls))
    return {info["pid"]: info for info in driver(cluster, code)}


def test_each_replica_runs_as_many_threads_as_its_num_cpus(serve_url):
    _, cluster = serve_url
    infos = replica_infos(cluster)
    assert len(infos) == 2, infos
    assert [info["threads"] for info in infos.values()] == [1, 1], infos  # num_cpus=1 on a 2-core machine


def test_a_flood_past_the_bound_gets_only_200_and_503_with_retry_after(serve_url):
    url, _ = serve_url
    batch = images(8, seed=500)
    barrier = threading.Barrier(48)

    def send(_):
        barrier.wait(30)
        files = [(f"f{i}", data) for i, data in enumerate(batch)]
        return requests.post(f"{url}/predictions/{NAME}", files=files, timeout=120)

    with futures.ThreadPoolExecutor(48) as pool:
        flood = list(pool.map(send, range(48)))  # 384 images at once, both replicas take 2 x 64 (a hang fails here)
    codes = [r.status_code for r in flood]
    assert set(codes) == {200, 503}, codes
    for refused in (r for r in flood if r.status_code == 503):
        assert int(refused.headers["Retry-After"]) >= 1, refused.headers
        # The replica's own refusal (its max_queued_images), or Ray's proxy queue full.
        assert refused.text.startswith("Request dropped due to backpressure") or \
            refused.json()["error"] == "overloaded", refused.text
    print("flood of 48 requests x 8 images on 2 replicas:", {c: codes.count(c) for c in set(codes)})
    assert requests.post(f"{url}/predictions/{NAME}", data=batch[0], timeout=60).status_code == 200


def test_a_deadline_that_passes_while_the_request_waits_is_a_504_never_decoded(serve_url):
    url, _ = serve_url
    # Not an image: decoded, it would be a 400. 2 ms is less than the batcher's 5 ms wait for a
    # batch to fill: the deadline passes while it waits.
    late = requests.post(f"{url}/predictions/{NAME}", data=b"not an image", headers={"X-Request-Timeout-Ms": "2"},
                         timeout=60)
    assert late.status_code == 504 and late.json()["error"] == "deadline_exceeded", late.text
    by_body = requests.post(f"{url}/v2/models/{NAME}/infer", json={"inputs": [
        {"name": "images", "shape": [1], "datatype": "BYTES", "data": [to_b64(b"not an image")]}],
        "parameters": {"timeout": 2000}}, timeout=60)
    assert by_body.status_code == 504, by_body.text
    assert requests.post(f"{url}/predictions/{NAME}", data=b"not an image", headers={"X-Request-Timeout-Ms": "30000"},
                         timeout=60).status_code == 400


def test_top_k_per_request_in_every_form_and_bad_values(serve_url, library):
    url, _ = serve_url
    batch = images(3, seed=600)
    want = library.classify(batch)  # the model's top_k is 3: every class
    paths = {"predictions": f"/predictions/{NAME}", "v1": f"/v1/models/{NAME}:predict", "v2": f"/v2/models/{NAME}/infer"}
    forms = [(form, k) for k in (1, 2) for form in top_k_forms(batch, k)]
    barrier = threading.Barrier(len(forms))

    def send(item):
        form, _ = item
        barrier.wait(30)  # together: a replica's batcher mixes them whatever their top_k
        return requests.post(url + paths[form.route], timeout=60, **form.kwargs)

    with futures.ThreadPoolExecutor(len(forms)) as pool:
        responses = list(pool.map(send, forms))
    for (form, k), response in zip(forms, responses):
        assert response.status_code == 200, (form.name, response.text)
        got = form.answers(response.json())
        same(got, [first(w, k) for w in want[: len(got)]])
    for what, route, kwargs in bad_top_k_requests(batch[0], classes=3):
        check_bad_top_k(requests.post(url + paths[route], timeout=60, **kwargs), what)


# ---- faults (last in this module: they change the cluster) ---------------------------------------


def replica_pids(cluster):
    """{node address: replica process id} of the live Serve replicas."""
    return driver(cluster, "print(json.dumps({a['Address']['IPAddress']: a['Pid'] for a in "
                           "ray._private.state.actors().values() if a['State'] == 'ALIVE' and "
                           "'ServeReplica' in a['ActorClassName']}))")


def send_while(url, stop, outcomes, library, timeout_s=30):
    """A client sending one-image requests until ``stop`` is set; each outcome is True (200 with
    the library's answer), False (200 with another answer), the status code of any other answer,
    or the exception's name (a timeout would be "ReadTimeout")."""
    image = images(1, seed=5)[0]
    (want,) = library.classify([image])
    while not stop.is_set():
        try:
            response = requests.post(f"{url}/predictions/{NAME}", data=image, timeout=timeout_s)
            if response.status_code == 200:
                got = response.json()
                outcomes.append(list(got) == list(want) and got == pytest.approx(want, abs=1e-4))
            else:
                outcomes.append(response.status_code)
        except requests.RequestException as exc:
            outcomes.append(type(exc).__name__)


def test_a_killed_loader_worker_is_healed_and_its_replica_serves_again(serve_url):
    url, cluster = serve_url
    (pid,) = [p for ip, p in replica_pids(cluster).items() if ip == cluster.node_ips[1]]
    served_before = replica_infos(cluster)[pid]["served"]
    workers = psutil.Process(pid).children()
    assert workers, "the replica has no loader worker processes"
    workers[0].kill()
    # Concurrent requests: Ray's proxy prefers the replica on its own node until that one holds
    # max_ongoing_requests (16 here); past it the victim's replica gets its share.
    batch = images(48, seed=300)
    for _ in range(3):
        with futures.ThreadPoolExecutor(48) as pool:
            statuses = list(pool.map(lambda image: requests.post(f"{url}/predictions/{NAME}", data=image,
                                                                 timeout=60).status_code, batch))
        assert statuses == [200] * 48, statuses  # the loader rebuilds its workers, or Ray replaces the replica
    wait_for_replicas(cluster, 2)
    # The victim's replica itself serves again: the same process, its loader workers replaced,
    # and more requests answered than before.
    infos = replica_infos(cluster)
    assert pid in infos, f"replica {pid} was replaced instead of healed: {infos}"
    assert infos[pid]["served"] > served_before, (served_before, infos[pid])
    alive = [p for p in psutil.Process(pid).children() if p.status() != psutil.STATUS_ZOMBIE]
    assert len(alive) == len(workers) and workers[0].pid not in [p.pid for p in alive]


def test_killing_the_node_of_a_replica_while_clients_send(serve_url, library):
    url, cluster = serve_url
    victim = cluster.node_ips[1]
    raylets = [p for p in psutil.process_iter(["cmdline"])
               if any("raylet" in part for part in (p.info["cmdline"] or [])[:1])
               and any(f"--node_ip_address={victim}" in part for part in p.info["cmdline"] or [])]
    assert len(raylets) == 1, raylets
    stop, before, during = threading.Event(), [], []
    clients = [threading.Thread(target=send_while, args=(url, stop, before, library)) for _ in range(4)]
    for client in clients:
        client.start()
    time.sleep(3)
    stop.set()
    for client in clients:
        client.join(60)
    assert before and set(before) == {True}, before  # both replicas serving, every answer right
    stop = threading.Event()
    clients = [threading.Thread(target=send_while, args=(url, stop, during, library)) for _ in range(4)]
    for client in clients:
        client.start()
    time.sleep(1)
    raylets[0].kill()  # the node dies: its raylet, and with it the replica and workers on it
    time.sleep(15)
    stop.set()
    for client in clients:
        client.join(60)
    assert not any(client.is_alive() for client in clients), "a client hangs"
    counts = {str(o): during.count(o) for o in set(during)}
    print("during the node's death, clients saw:", counts)
    assert False not in during, counts  # no wrong answer
    errors = [o for o in during if o is not True]
    # Only the requests on the dying replica may fail, each with a 5xx (or a reset connection).
    assert all((isinstance(o, int) and o >= 500) or o == "ConnectionError" for o in errors), counts
    assert len(errors) <= 8, counts
    assert during.count(True) >= 20, counts  # the other replica kept serving throughout
    cluster.start_node("127.0.0.4")  # a replacement node: Ray restores the second replica there
    wait_for_replicas(cluster, 2)
    assert sorted(replica_pids(cluster)) == sorted([HEAD_IP, "127.0.0.4"]), replica_pids(cluster)  # it moved
    batch = images(6, seed=400)
    for image, want in zip(batch, library.classify(batch)):
        response = requests.post(f"{url}/predictions/{NAME}", data=image, timeout=60)
        assert response.status_code == 200, response.text
        same([response.json()], [want])


def test_a_replica_stopped_by_a_scale_down_under_load_finishes_what_it_admitted(serve_url, model_dir, library):
    """Ray stops a replica (scale-down, redeploy) by draining it: its router sends it nothing new
    and it has drain_timeout_s (graceful_shutdown_timeout_s) to answer what it admitted."""
    url, cluster = serve_url
    stop, outcomes = threading.Event(), []
    clients = [threading.Thread(target=send_while, args=(url, stop, outcomes, library)) for _ in range(4)]
    for client in clients:
        client.start()
    time.sleep(2)
    deploy(cluster, model_dir, replicas=1)
    wait_for_replicas(cluster, 1)
    time.sleep(2)
    stop.set()
    for client in clients:
        client.join(60)
    counts = {str(o): outcomes.count(o) for o in set(outcomes)}
    print("while a replica was stopped, clients saw:", counts)
    assert outcomes and set(outcomes) == {True}, counts  # nothing lost, nothing wrong
