#!/usr/bin/env python
"""Build the storage layout KServe's TorchServe runtime expects, ready to upload to a bucket or PVC:

    OUT/config/config.properties     TorchServe config with model_snapshot (which models, how many workers)
    OUT/config/metrics.yaml          TorchServe's metrics plus the handler's own
    OUT/model-store/<name>.mar       the archives

    .venv/bin/python scripts/kserve_package.py [--out build/kserve] [--mar model_store/shapes.mar ...]
        [--min-workers 1] [--max-workers 1] [--batch-size 8] [--max-batch-delay 10]

Inside the pod TorchServe listens on all interfaces (the pod network; KServe's router in front) and
token authorization is off, because KServe's TorchServe wrapper sends no Authorization header:
keep the InferenceService behind the cluster's network policy / ingress authentication.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIG_TEMPLATE = """\
# TorchServe inside KServe's TorchServe runtime (mounted at /mnt/models).
inference_address=http://0.0.0.0:8085
management_address=http://0.0.0.0:8085
metrics_address=http://0.0.0.0:8082
grpc_inference_port=7070
grpc_management_port=7071
enable_metrics_api=true
metrics_mode=prometheus
metrics_config=/mnt/models/config/metrics.yaml
number_of_netty_threads=4
job_queue_size=32
model_store=/mnt/models/model-store
# KServe's wrapper sends no token: authorization is left to the cluster (network policy, ingress).
disable_token_authorization=true
enable_model_api=false
max_request_size=67108864
max_response_size=16777216
model_snapshot={snapshot}
"""


def snapshot(mars: list[Path], min_workers: int, max_workers: int, batch_size: int, delay_ms: int) -> str:
    models = {
        mar.stem: {"1.0": {"defaultVersion": True, "marName": mar.name, "minWorkers": min_workers,
                           "maxWorkers": max_workers, "batchSize": batch_size, "maxBatchDelay": delay_ms,
                           "responseTimeout": 120}}
        for mar in mars
    }
    return json.dumps({"name": "startup.cfg", "modelCount": len(models), "models": models}, separators=(",", ":"))


def package(out: Path, mars: list[Path], min_workers: int = 1, max_workers: int = 1, batch_size: int = 8,
            delay_ms: int = 10) -> Path:
    """Write the layout under ``out`` (replacing what was there); returns ``out``."""
    for mar in mars:
        if not mar.is_file():
            raise SystemExit(f"kserve_package: {mar} not found (build it with scripts/build_mar.py)")
    if out.exists():
        shutil.rmtree(out)
    (out / "config").mkdir(parents=True)
    (out / "model-store").mkdir()
    for mar in mars:
        shutil.copy(mar, out / "model-store" / mar.name)
    config = CONFIG_TEMPLATE.format(snapshot=snapshot(mars, min_workers, max_workers, batch_size, delay_ms))
    (out / "config" / "config.properties").write_text(config)
    shutil.copy(ROOT / "metrics.yaml", out / "config" / "metrics.yaml")  # the handler's custom metrics
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "kserve")
    parser.add_argument("--mar", type=Path, nargs="+", default=[ROOT / "model_store" / "shapes.mar"])
    parser.add_argument("--min-workers", type=int, default=1)
    parser.add_argument("--max-workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batch-delay", type=int, default=10)
    args = parser.parse_args()
    out = package(args.out, args.mar, args.min_workers, args.max_workers, args.batch_size, args.max_batch_delay)
    print(f"wrote {out}: upload it and point storageUri at it (deploy/kserve/README.md)", file=sys.stderr)


if __name__ == "__main__":
    main()
