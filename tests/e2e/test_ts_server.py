"""The test servers' own start-up: a port taken between choosing it and TorchServe binding it
(another process got there first) means a retry on fresh ports, not a failed test."""

import socket
from contextlib import closing

import harness.ts_server as ts_server
from harness.ts_server import start_server


def test_a_port_taken_before_torchserve_binds_it_is_retried_on_fresh_ports(model_store, tmp_path, monkeypatch):
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        real_free_port = ts_server.free_port
        handed: list[int] = []

        def first_the_taken_one() -> int:
            port = taken_port if not handed else real_free_port()
            handed.append(port)
            return port

        monkeypatch.setattr(ts_server, "free_port", first_the_taken_one)
        server = start_server(tmp_path, model_store, ["shapes.mar"])
        try:
            assert handed.count(taken_port) == 1 and len(handed) >= 10  # a second set of ports
            assert not server.inference_url.endswith(f":{taken_port}")
            assert server.ready_workers("shapes")
        finally:
            server.stop()
