"""A machine without a C++ compiler still serves the shipped archive on torch: eager, with one log
line. (OpenVINO, the CPU default, needs no compiler.)"""

import pytest

from helpers import shape_image
from harness.archives import with_settings
from harness.ts_server import start_server

pytestmark = pytest.mark.e2e


def test_without_a_cpp_compiler_torch_serves_eager_and_says_so_once(model_store, tmp_path):
    workdir = tmp_path / "server"
    workdir.mkdir()
    store = with_settings(model_store / "shapes.mar", {"runtime": "torch"}, tmp_path / "store").parent
    # Inductor takes its compiler from $CXX: one that does not exist is a machine without one.
    server = start_server(workdir, store, ["shapes.mar"], env={"CXX": "/nonexistent/g++"})
    try:
        response = server.predict(data=shape_image("square", 77, size_range=(0.4, 0.8)))
        assert response.status_code == 200 and next(iter(response.json())) == "square", response.text
        log = (workdir / "logs" / "model_log.log").read_text()
    finally:
        server.stop()
    lines = [line for line in log.splitlines() if "torch.compile" in line]
    assert len(lines) == 1, lines
    assert "torch.compile off (handler.compile is auto but no working C++ compiler was found" in lines[0]
    assert "serving the eager model" in lines[0]
