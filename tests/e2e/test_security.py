"""The shipped configuration: tokens required, no model registration from URLs, loopback only."""

import psutil
import pytest
import requests

from helpers import shape_image

pytestmark = pytest.mark.e2e


def test_inference_and_management_need_the_token(server):
    image = shape_image("circle", 1)
    url = f"{server.inference_url}/predictions/shapes"
    assert requests.post(url, data=image, timeout=30).status_code in (400, 401, 403)
    wrong = {"Authorization": "Bearer not-the-key"}
    assert requests.post(url, data=image, headers=wrong, timeout=30).status_code in (400, 401, 403)
    assert requests.get(f"{server.management_url}/models", timeout=30).status_code in (400, 401, 403)
    # The inference key does not open the management API.
    response = requests.get(f"{server.management_url}/models", headers=server.auth("inference"), timeout=30)
    assert response.status_code in (400, 401, 403), response.text
    assert server.predict(data=image).status_code == 200


@pytest.mark.parametrize("url", ["https://example.com/evil.mar", "file:///etc/passwd", "/tmp/other.mar"])
def test_registering_models_from_urls_is_refused(server, url):
    response = server.manage("POST", "/models", params={"url": url})
    assert response.status_code in (400, 403, 404, 405), response.text
    names = [m["modelName"] for m in server.manage("GET", "/models").json()["models"]]
    assert sorted(names) == ["efficientnet_lite0", "resnet_random", "shapes", "shapes_pt2", "shapes_ts"]


def test_servers_listen_on_loopback_only(server):
    frontend = psutil.Process(server.process.pid)
    processes = [frontend, *frontend.children(recursive=True)]
    listening = [
        c.laddr
        for p in processes
        for c in getattr(p, "net_connections", getattr(p, "connections", None))(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening, "found no listening sockets"
    assert all(addr.ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for addr in listening), listening
