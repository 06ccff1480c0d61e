#!/usr/bin/env python
"""End-to-end REST benchmark: TorchServe's stock image_classifier at its best vs this handler, same weights.

One TorchServe serves models built from the SAME weights: the stock handler at its best, four
ways: ``stock`` (``--handler image_classifier``, eager) and ``stock_compiled`` (the same with
TorchServe's own ``pt2: {compile: {enable: true}}``), each with one worker and with two
(``_2w``: TorchServe's own CPU default is a worker per core); ``ours`` (this handler with its
shipped defaults: only ``arch`` is set, plus the shipped model's settings and gate record) and
``ours_fp32`` (the same with ``precision: fp32``: what the precision alone adds). The weights: calibrated random weights of a torchvision
architecture, or with ``--arch efficientnet_lite0`` the real ImageNet model (the stock handler
then gets that model's own preprocessing through a subclass: see stock_handler_file). Clients send 32-image
batches of real photos (skimage.data, re-encoded as JPEG): to stock as 32 concurrent single-image
requests (server-side batchSize 32), to ours as ONE 32-image request: multipart/mixed as
scripts/client.py sends it, and also as multipart/form-data (which TorchServe decodes itself,
more slowly). Rounds interleave them all; ``--runs`` repeats the whole measurement (each run:
``--rounds`` interleaved rounds per size). Reports per variant the median images/s over the runs
with their min and max, p50/p95/p99 latency per batch (all runs' batches), the headline ratios
against the best of the four stock variants (by median throughput), ours against ours in fp32,
TorchServe's own share (a handler that ignores the images), and the machine (CPU model, features).

    scripts/setup.sh --bench && .venv/bin/python benchmarks/benchmark.py [--quick] [--arch NAME] [--runs 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import requests
import yaml

from harness.bench_images import photo_jpegs, stock_input
from harness.model_dirs import random_model_dir
from harness.wire import multipart_mixed
from handler.model.architectures import LOCAL_ARCHITECTURES
from harness.commands import load_command
from harness.ts_server import Server, start_server
from harness.machine import machine
from harness.timing import latency_summary

ROOT = Path(__file__).resolve().parent.parent

BATCH = 32
# The stock handler's four ways: eager or TorchServe's pt2 compile, one worker or two.
STOCK = ("stock", "stock_2w", "stock_compiled", "stock_compiled_2w")
OURS = ("ours", "ours_fp32", "ours_form_data")

def stock_model_file(arch: str, classes: int) -> str:
    """A model file defining exactly one class that builds ``arch`` (TorchServe's eager path): a
    torchvision model, or one of handler/model/architectures.py (shipped beside it as an extra file)."""
    build = (f'torchvision.models.get_model("{arch}", weights=None, num_classes={classes})'
             if arch not in LOCAL_ARCHITECTURES else f'architectures.build_model("{arch}", {classes})')
    return (
        "import torch\nimport torchvision\n\nimport architectures\n\n\n"
        "class Model(torch.nn.Module):\n"
        f'    """{arch}, wrapped so that the state_dict keys match the bare model."""\n\n'
        "    def __new__(cls):\n"
        f"        return {build}\n"
    )


ECHO_HANDLER = '''"""Answers without looking at the images: what TorchServe's transport alone costs."""


def handle(data, context):
    # TorchServe calls the entry point once with no data to initialize it.
    return ["{}" for _ in data] if data else None
'''


def stock_handler_file(handler: dict) -> str:
    """TorchServe's stock image_classifier with a model's own preprocessing, the way its users
    change it (a subclass replacing the class attribute ``image_processing``): the same PIL loop,
    with the model's resize, interpolation, crop, mean and std instead of ImageNet's."""
    from handler.config import HandlerConfig

    config = HandlerConfig.from_mapping(handler)
    return (
        "from torchvision import transforms\n"
        "from ts.torch_handler.image_classifier import ImageClassifier\n\n\n"
        "class ModelPreprocessing(ImageClassifier):\n"
        '    """The stock handler with the model\'s own preprocessing."""\n\n'
        "    image_processing = transforms.Compose([\n"
        f"        transforms.Resize({config.resize_size}, interpolation=transforms.InterpolationMode({config.interpolation!r})),\n"
        f"        transforms.CenterCrop({config.image_size}),\n"
        "        transforms.ToTensor(),\n"
        f"        transforms.Normalize(mean={list(config.mean)}, std={list(config.std)}),\n"
        "    ])\n"
    )


def model_weights(arch: str, work: Path) -> tuple[Path, Path]:
    """(weights, labels): the real ImageNet model's, or calibrated random weights of ``arch``."""
    if arch == "efficientnet_lite0":
        build_mar = load_command("scripts/build_mar.py")
        build_mar.ensure_lite0_weights()
        return build_mar.LITE0_WEIGHTS, build_mar.LITE0_DIR / "index_to_name.json"
    model_dir = random_model_dir(work / "weights", arch, calibration=stock_input(photo_jpegs("640x480", 16)))
    return model_dir / "weights.pt", model_dir / "index_to_name.json"


def build_archives(arch: str, store: Path, work: Path) -> None:
    build_mar = load_command("scripts/build_mar.py")
    weights, labels = model_weights(arch, work)
    common = {"minWorkers": 1, "maxWorkers": 1, "responseTimeout": 300, "startupTimeout": 900}
    two = {"minWorkers": 2, "maxWorkers": 2}
    stock = {**common, "batchSize": BATCH, "maxBatchDelay": 100}
    # TorchServe's own compile option for the stock handler (an eager model file).
    compiled = {**stock, "pt2": {"compile": {"enable": True}}}
    stock_cfgs = {"stock": stock, "stock_2w": {**stock, **two}, "stock_compiled": compiled,
                  "stock_compiled_2w": {**compiled, **two}}
    ours_cfg = work / "ours.yaml"
    # Ours as shipped: the real model with its model-config.yaml's handler section (its own
    # preprocessing), any other with every handler setting at its default.
    handler = {"arch": arch}
    if arch == "efficientnet_lite0":
        handler = yaml.safe_load((load_command("scripts/build_mar.py").LITE0_DIR / "model-config.yaml").read_text())[
            "handler"]
    ours_cfg.write_text(yaml.safe_dump({**common, "batchSize": 8, "maxBatchDelay": 5, "handler": handler}))
    model_file = work / "stock_model.py"
    model_file.write_text(stock_model_file(arch, 1000))
    stock_handler = "image_classifier"  # TorchServe's own, with ImageNet's preprocessing
    if arch == "efficientnet_lite0":  # its own normalization and bicubic resize: stock gets them too
        stock_handler = str(work / "stock_handler.py")
        Path(stock_handler).write_text(stock_handler_file(handler))
    archiver = str(Path(sys.executable).parent / "torch-model-archiver")
    for name, config in stock_cfgs.items():
        (work / f"{name}.yaml").write_text(yaml.safe_dump(config))
        subprocess.run([archiver, "--model-name", name, "--version", "1.0", "--model-file", str(model_file),
                        "--serialized-file", str(weights), "--handler", stock_handler,
                        "--extra-files", f"{labels},{ROOT / 'handler' / 'model' / 'architectures.py'}",
                        "--config-file", str(work / f"{name}.yaml"), "--export-path", str(store), "--force"],
                       check=True)
    # The real model carries its gate record, as shipped; random weights (speed stand-ins) have
    # none, so ours runs them in fp32 like any ungated model.
    record = build_mar.LITE0_DIR / "gate_record.json" if arch == "efficientnet_lite0" else None
    for name, precision in (("ours", []), ("ours_fp32", ["--precision", "fp32"])):
        subprocess.run([sys.executable, str(ROOT / "scripts" / "build_mar.py"), "--arch", arch, "--weights",
                        str(weights), "--labels", str(labels), "--name", name, "--export-path", str(store),
                        "--config", str(ours_cfg), *precision, *(["--record", str(record)] if record else [])],
                       check=True, stdout=subprocess.DEVNULL)
    echo = work / "echo_handler.py"
    echo.write_text(ECHO_HANDLER)
    subprocess.run([archiver, "--model-name", "echo", "--version", "1.0", "--handler", str(echo),
                    "--config-file", str(ours_cfg), "--export-path", str(store), "--force"], check=True)


def ours_runs_in(server: Server, name: str = "ours") -> str:
    """What ours' worker chose (runtime and precision), from its own log lines."""
    lines = (server.workdir / "logs" / "model_log.log").read_text().splitlines()
    chosen = {}
    for line in lines:
        if f"-{name}_1.0-" in line:
            for what in ("runtime", "precision"):
                marker = f"MODEL_LOG - {what} "
                if marker in line:
                    chosen[what] = line.split(marker, 1)[1].split(" ", 1)[0]
    return f"{chosen.get('runtime', '?')} {chosen.get('precision', '?')}"


def send_stock(server: Server, pool: futures.ThreadPoolExecutor, images: list[bytes],
               model: str = "stock") -> list[dict]:
    """32 concurrent single-image requests: the stock handler's one-image contract."""
    url = f"{server.inference_url}/predictions/{model}"
    headers = server.auth()

    def one(data: bytes) -> dict:
        response = requests.post(url, data=data, headers=headers, timeout=300)
        response.raise_for_status()
        return response.json()

    return list(pool.map(one, images))


def send_ours(server: Server, images: list[bytes], model: str = "ours", form_data: bool = False) -> list[dict]:
    """One request with every image: multipart/mixed as scripts/client.py sends it, or a
    multipart/form-data upload (which TorchServe decodes itself, more slowly)."""
    files = [(f"img{i}", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    if form_data:
        response = server.predict(model, files=files)
    else:
        body, content_type = multipart_mixed(files)
        response = server.predict(model, data=body, headers={"Content-Type": content_type})
    response.raise_for_status()
    return response.json()


def agreement(stock: list[dict], ours: list[dict]) -> dict[str, float]:
    """Top-1 agreement and the largest difference of the stock top-1 probability."""
    same = sum(next(iter(s)) == next(iter(o)) for s, o in zip(stock, ours))
    diffs = [abs(s[next(iter(s))] - o.get(next(iter(s)), 0.0)) for s, o in zip(stock, ours)]
    # With random weights the top-1 class may barely vary; say how many distinct ones there were.
    return {"top1_agreement": round(same / len(stock), 3), "max_top1_prob_diff": round(max(diffs), 6),
            "distinct_top1": len({next(iter(s)) for s in stock})}


def request_kinds(server: Server, pool: futures.ThreadPoolExecutor, images: list[bytes]) -> dict[str, Callable[[], object]]:
    """Every kind of request a round sends ``images`` as, by name."""
    return {
        **{name: (lambda name=name: send_stock(server, pool, images, name)) for name in STOCK},
        "ours": lambda: send_ours(server, images),
        "ours_fp32": lambda: send_ours(server, images, "ours_fp32"),
        "ours_form_data": lambda: send_ours(server, images, form_data=True),
        # The same 32-image request to a handler that ignores it: TorchServe's own share.
        "echo": lambda: send_ours(server, images, "echo"),
        "echo_form_data": lambda: send_ours(server, images, "echo", form_data=True),
    }


def warm_up(server: Server, seconds: float) -> None:
    """Traffic of every kind for ``seconds`` before anything is timed: the JVM compiles its hot
    paths during the first seconds of load (measured here: ours' mean latency fell from 124 to
    111 ms over three 60-request windows of one fresh server), which would count against
    whichever size is measured first."""
    deadline = time.monotonic() + seconds
    with futures.ThreadPoolExecutor(BATCH) as pool:
        sends = request_kinds(server, pool, photo_jpegs("640x480", BATCH)).values()
        while time.monotonic() < deadline:
            for send in sends:
                send()


def run_size(server: Server, size: str, rounds: int, clients: int = 1) -> dict:
    """One run at one image size: every request kind for ``rounds`` rounds, interleaved; with
    ``clients`` > 1 each kind's round is that many clients sending a batch at once (throughput:
    images over the round's wall time; latency: per batch, as each client sees it)."""
    images = photo_jpegs(size, BATCH)
    with futures.ThreadPoolExecutor(BATCH * clients) as pool, futures.ThreadPoolExecutor(clients) as sending:
        senders = request_kinds(server, pool, images)
        latencies: dict[str, list[float]] = {name: [] for name in senders}
        busy: dict[str, float] = {name: 0.0 for name in senders}
        reference_stock = send_stock(server, pool, images)  # warm-up, also the agreement check
        reference_ours = send_ours(server, images)
        for _ in range(2):  # more warm-up: the JVM and every worker settle in
            for send in senders.values():
                send()

        def timed(send: Callable[[], object]) -> float:
            start = time.perf_counter()
            send()
            return (time.perf_counter() - start) * 1000

        for _ in range(rounds):  # interleaved: machine noise hits all alike
            for name, send in senders.items():
                start = time.perf_counter()
                latencies[name] += list(sending.map(lambda _: timed(send), range(clients)))
                busy[name] += time.perf_counter() - start
    result: dict = {"image_size": size}
    for name in (*STOCK, *OURS, "echo", "echo_form_data"):
        lat = latencies[name]
        result[name] = {"images_per_s": round(BATCH * len(lat) / busy[name], 1), "latencies_ms": lat}
    result["outputs"] = agreement(reference_stock, reference_ours)
    return result


def summarize(size: str, runs: list[dict]) -> dict:
    """The runs at one size: per variant the median images/s with min and max, latency
    percentiles over every run's batches; the ratios from the medians."""
    row: dict = {"image_size": size, "runs": len(runs)}
    for name in (*STOCK, *OURS, "echo", "echo_form_data"):
        speeds = [r[name]["images_per_s"] for r in runs]
        row[name] = {"images_per_s": round(statistics.median(speeds), 1), "min": min(speeds), "max": max(speeds),
                     **latency_summary([ms for r in runs for ms in r[name]["latencies_ms"]])}
    best = max(STOCK, key=lambda name: row[name]["images_per_s"])
    row["best_stock"] = best
    row["throughput_ratio"] = round(row["ours"]["images_per_s"] / row[best]["images_per_s"], 2)
    row["p50_ratio"] = round(row[best]["p50_ms"] / row["ours"]["p50_ms"], 2)
    row["fp32_throughput_ratio"] = round(row["ours_fp32"]["images_per_s"] / row[best]["images_per_s"], 2)
    row["precision_share"] = round(row["ours"]["images_per_s"] / row["ours_fp32"]["images_per_s"], 2)
    row["form_data_throughput_ratio"] = round(row["ours_form_data"]["images_per_s"] / row[best]["images_per_s"], 2)
    row["form_data_p50_ratio"] = round(row[best]["p50_ms"] / row["ours_form_data"]["p50_ms"], 2)
    # The spread of the headline: each run's own ratio against that run's best stock.
    per_run = [r["ours"]["images_per_s"] / max(r[name]["images_per_s"] for name in STOCK) for r in runs]
    row["throughput_ratio_per_run"] = [round(x, 2) for x in per_run]
    row["outputs"] = runs[0]["outputs"]
    row["transport_floor_p50_ms"] = row["echo"]["p50_ms"]
    row["transport_floor_form_data_p50_ms"] = row["echo_form_data"]["p50_ms"]
    return row


def cell(entry: dict) -> str:
    return f"{entry['images_per_s']} ({entry['min']}–{entry['max']})"


def markdown(result: dict) -> str:
    ours, m = result["ours_runs_in"], result["machine"]
    lines = [f"Model `{result['arch']}`, {BATCH}-image batches from {result['clients']} client(s) at once; "
             f"{m['cpu_model']} ({', '.join(m['cpu_features']) or 'no AVX-512'}), {m['cpu_count']} CPUs; "
             f"images/s: median of {result['runs']} runs (min–max); ours with its shipped defaults (here: {ours}); "
             f"ours fp32 the same with `precision: fp32` (here: {result['ours_fp32_runs_in']}); stock in fp32; "
             "× against the best of the four stock variants (by median throughput).", "",
             "| image size | stock eager 1 worker | stock eager 2 workers | stock pt2 1 worker | stock pt2 2 workers "
             "| ours | ours fp32 | ours × best stock (per run) | ours fp32 × best stock | stock p50 ms (best) "
             "| ours p50/p95/p99 ms | p50 × | transport-only p50 ms | top-1 agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["e2e"]:
        o, b = row["ours"], row[row["best_stock"]]
        lines.append(f"| {row['image_size']} | {' | '.join(cell(row[name]) for name in STOCK)} | {cell(o)} | "
                     f"{cell(row['ours_fp32'])} | {row['throughput_ratio']} ({', '.join(map(str, row['throughput_ratio_per_run']))}) | "
                     f"{row['fp32_throughput_ratio']} | {b['p50_ms']} | {o['p50_ms']}/{o['p95_ms']}/{o['p99_ms']} | "
                     f"{row['p50_ratio']} | {row['transport_floor_p50_ms']} | {row['outputs']['top1_agreement']} |")
    lines += ["", "Ours sent as multipart/form-data instead (TorchServe then decodes the upload in its frontend):", "",
              "| image size | ours img/s | throughput × | ours p50/p95/p99 ms | p50 × | transport-only p50 ms |",
              "|---|---|---|---|---|---|"]
    for row in result["e2e"]:
        f = row["ours_form_data"]
        lines.append(f"| {row['image_size']} | {cell(f)} | {row['form_data_throughput_ratio']} | "
                     f"{f['p50_ms']}/{f['p95_ms']}/{f['p99_ms']} | {row['form_data_p50_ratio']} | "
                     f"{row['transport_floor_form_data_p50_ms']} |")
    lines += ["", "transport-only: the same 32-image request to a handler that answers without reading it "
              "(TorchServe's HTTP, multipart and worker-socket cost, which ours pays too)."]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["image_size"] for r in result["e2e"]]
    x = range(len(sizes))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bars = [(name, name.replace("_", " ")) for name in STOCK] + [("ours", "ours"), ("ours_fp32", "ours fp32")]
    width = 0.8 / len(bars)
    for i, (name, label) in enumerate(bars):
        offset = (i - (len(bars) - 1) / 2) * width
        left.bar([j + offset for j in x], [r[name]["images_per_s"] for r in result["e2e"]], width, label=label)
        right.bar([j + offset for j in x], [r[name]["p50_ms"] for r in result["e2e"]], width, label=label)
    left.set(title="throughput (images/s, median of runs)", xticks=list(x), xticklabels=sizes)
    right.set(title=f"p50 latency per {BATCH}-image batch (ms)", xticks=list(x), xticklabels=sizes)
    left.legend(fontsize="small")
    fig.suptitle(f"TorchServe stock image_classifier (fp32, 4 ways) vs this handler ({result['ours_runs_in']}) "
                 f"— {result['arch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mobilenet_v3_small")
    parser.add_argument("--quick", action="store_true", help="one size, one run of few rounds")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=1, help="clients sending a 32-image batch at once")
    parser.add_argument("--sizes", nargs="+", default=["640x480"])
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "benchmark.json")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.rounds, args.runs = ["640x480"], 2, 1

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        tmp_path = Path(tmp)
        store = tmp_path / "store"
        store.mkdir()
        build_archives(args.arch, store, tmp_path)
        (tmp_path / "server").mkdir()
        server = start_server(tmp_path / "server", store, [f"{name}.mar" for name in STOCK] +
                              ["ours.mar", "ours_fp32.mar", "echo.mar"])
        try:
            runs_in = ours_runs_in(server), ours_runs_in(server, "ours_fp32")
            print(f"ours runs in {runs_in[0]} here, ours_fp32 in {runs_in[1]}; stock in fp32", flush=True)
            warm_up(server, 5 if args.quick else 30)
            measured: dict[str, list[dict]] = {size: [] for size in args.sizes}
            for run in range(args.runs):
                for size in args.sizes:
                    measured[size].append(run_size(server, size, args.rounds, args.clients))
                    print(json.dumps({"run": run + 1, "size": size, **{
                        name: measured[size][-1][name]["images_per_s"] for name in (*STOCK, *OURS)}}), flush=True)
        finally:
            server.stop()
    rows = [summarize(size, measured[size]) for size in args.sizes]
    result = {"arch": args.arch, "images_per_request": BATCH, "clients": args.clients, "ours_runs_in": runs_in[0],
              "ours_fp32_runs_in": runs_in[1], "e2e": rows, "machine": machine(), "runs": args.runs,
              "rounds": args.rounds, "seconds": round(time.time() - started, 1)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    args.json.with_suffix(".md").write_text(markdown(result) + "\n")
    plot(result, args.json.with_suffix(".png"))
    print("\n" + markdown(result))
    print(f"\nwrote {args.json}, .md and .png in {result['seconds']} s")


if __name__ == "__main__":
    main()
