#!/usr/bin/env python3
"""Classify a folder (or globs) of images through the server, in batched requests.

    .venv/bin/python scripts/client.py PATH... [--batch 32] [--concurrency 4] [--url URL] [--model shapes]
                                       [--out results.jsonl] [--token KEY | --key-file key_file.json]
                                       [--form-data]

Writes one JSON line per image: {"path", "label", "scores"} or {"path", "error", "reason"}.
The token comes from --token, else $TS_INFERENCE_KEY, else the "inference" key of --key-file.
A request rejected because of some of its images is sent again without them, so one bad file
costs only itself. Exit status: 0 when every image was classified, 1 otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import os
import time
from pathlib import Path
from typing import Any

import requests

from handler.offline import OUTPUT_SUFFIXES, RowWriter, error_row, result_row
from harness.wire import multipart_mixed
from image_files import Progress, expand_or_exit, finish, write_rows

def read_token(args: argparse.Namespace) -> str:
    if args.token:
        return args.token
    if os.environ.get("TS_INFERENCE_KEY"):
        return os.environ["TS_INFERENCE_KEY"]
    try:
        return json.loads(args.key_file.read_text())["inference"]["key"]
    except (OSError, KeyError, ValueError) as exc:
        raise SystemExit(f"client: no token: pass --token, set TS_INFERENCE_KEY or point --key-file at "
                         f"TorchServe's key_file.json ({exc})")


# A 503 (the server sheds load, or drains) is retried after its Retry-After, this many times.
MAX_RETRIES_503 = 6


def post_until_admitted(session: requests.Session, url: str, files: list, form_data: bool,
                        retries: int = MAX_RETRIES_503) -> requests.Response:
    """The request's response; a 503 is sent again after the server's ``Retry-After`` (else 1,
    2, 4, ... s), up to ``retries`` times, so that a busy server costs time, not results."""
    for attempt in range(retries + 1):
        if form_data:
            response = session.post(url, files=files, timeout=300)
        else:
            body, content_type = multipart_mixed(files)
            response = session.post(url, data=body, headers={"Content-Type": content_type}, timeout=300)
        if response.status_code != 503 or attempt == retries:
            return response
        advice = response.headers.get("Retry-After", "")
        time.sleep(min(float(advice), 60.0) if advice.isdigit() else float(2 ** attempt))
    raise AssertionError("unreachable")


def classify(session: requests.Session, url: str, paths: list[Path], form_data: bool = False) -> list[dict[str, Any]]:
    """One batched request; on a per-image 4xx, the failing images are reported and the rest re-sent."""
    results: dict[int, dict[str, Any]] = {}
    pending = list(range(len(paths)))
    while pending:
        files = []
        for i in pending:
            try:
                files.append((f"f{i}", (paths[i].name, paths[i].read_bytes(), "application/octet-stream")))
            except OSError as exc:
                results[i] = error_row(str(paths[i]), "unreadable", str(exc))
        pending = [i for i in pending if i not in results]
        if not pending:
            break
        try:
            response = post_until_admitted(session, url, files, form_data)
            body = response.json()
        except (requests.RequestException, ValueError) as exc:
            for i in pending:
                results[i] = error_row(str(paths[i]), "request_failed", str(exc))
            break
        if response.status_code == 200:
            predictions = body if len(pending) > 1 else [body]
            for i, scores in zip(pending, predictions):
                results[i] = result_row(str(paths[i]), scores)
            break
        named = body.get("images", []) if isinstance(body, dict) else []
        bad = {pending[p["index"]]: p.get("reason", "") for p in named if 0 <= p.get("index", -1) < len(pending)}
        error = body.get("error", str(response.status_code)) if isinstance(body, dict) else str(response.status_code)
        message = body.get("message", response.text[:200]) if isinstance(body, dict) else response.text[:200]
        if not bad:  # the whole request was refused: every image gets the server's message
            bad = {i: message for i in pending}
        for i, reason in bad.items():
            results[i] = error_row(str(paths[i]), error, reason or message)
        pending = [i for i in pending if i not in results]
    return [results[i] for i in range(len(paths))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="image files, folders or globs")
    parser.add_argument("--batch", type=int, default=32, help="images per request")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--out", type=Path, default=Path("results.jsonl"), help="results: .jsonl or .parquet")
    parser.add_argument("--token")
    parser.add_argument("--key-file", type=Path, default=Path("key_file.json"))
    parser.add_argument("--form-data", action="store_true",
                        help="send multipart/form-data (slower through TorchServe) instead of multipart/mixed")
    args = parser.parse_args()
    if args.batch < 1 or args.concurrency < 1:
        parser.error("--batch and --concurrency must be at least 1")
    if args.out.suffix not in OUTPUT_SUFFIXES:
        parser.error(f"--out must end in {' or '.join(OUTPUT_SUFFIXES)}")

    paths = expand_or_exit(args.paths, "client")
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {read_token(args)}"
    url = f"{args.url.rstrip('/')}/predictions/{args.model}"
    chunks = [paths[i : i + args.batch] for i in range(0, len(paths), args.batch)]
    progress = Progress(len(paths))
    failures = []
    with RowWriter(args.out) as writer, futures.ThreadPoolExecutor(args.concurrency) as pool:
        for rows in pool.map(lambda chunk: classify(session, url, chunk, args.form_data), chunks):
            write_rows(writer, rows, progress)
            failures += [r for r in rows if "error" in r]
    finish(writer, failures)


if __name__ == "__main__":
    main()
