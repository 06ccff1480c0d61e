"""scripts/client.py honours a 503's Retry-After instead of reporting the images as failed."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

from helpers import load_command

client = load_command("scripts/client.py")


class Shedding(BaseHTTPRequestHandler):
    """Answers 503 + Retry-After: 1 to the first ``refusals`` requests, then 200."""

    refusals = 2
    seen: list[float] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        Shedding.seen.append(time.monotonic())
        if len(Shedding.seen) <= Shedding.refusals:
            status, body, headers = 503, {"error": "overloaded", "message": "full"}, {"Retry-After": "1"}
        else:
            status, body, headers = 200, [{"circle": 0.9}, {"square": 0.8}], {}
        data = json.dumps(body).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_a_503_is_retried_after_its_retry_after_and_the_images_are_classified(tmp_path):
    Shedding.seen = []
    paths = []
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"image bytes")
        paths.append(tmp_path / name)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Shedding)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/predictions/shapes"
        with requests.Session() as session:
            rows = client.classify(session, url, paths)
    finally:
        server.shutdown()
        server.server_close()
    assert [row["label"] for row in rows] == ["circle", "square"], rows
    gaps = [b - a for a, b in zip(Shedding.seen, Shedding.seen[1:])]
    assert len(Shedding.seen) == 3 and all(gap >= 0.9 for gap in gaps), gaps  # waited as advised


def test_a_503_that_lasts_is_reported_after_the_retries(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(b"image bytes")
    Shedding.seen = []
    monkeypatch.setattr(Shedding, "refusals", 100)
    monkeypatch.setattr(client.time, "sleep", lambda s: None)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Shedding)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/predictions/shapes"
        with requests.Session() as session:
            (row,) = client.classify(session, url, [tmp_path / "a.png"])
    finally:
        server.shutdown()
        server.server_close()
    assert row["error"] == "overloaded" and len(Shedding.seen) == client.MAX_RETRIES_503 + 1
