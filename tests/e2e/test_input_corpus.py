"""Unusual and bad input against the real server: unusual images succeed, bad requests fail alone."""

import base64
import concurrent.futures as futures
import io

import pytest
from PIL import Image

from helpers import encode, shape_image

pytestmark = pytest.mark.e2e
LABELS = {"circle", "square", "triangle"}


def base_image(label: str = "triangle", seed: int = 3) -> Image.Image:
    return Image.open(io.BytesIO(shape_image(label, seed, size_range=(0.5, 0.8)))).convert("RGB")


def animated_gif() -> bytes:
    first = base_image()
    buffer = io.BytesIO()
    first.save(buffer, "GIF", save_all=True, append_images=[Image.new("RGB", first.size, (0, 0, 0))])
    return buffer.getvalue()


def exif_rotated_jpeg() -> bytes:
    # Stored rotated by 90 degrees, with EXIF orientation 8 asking viewers to rotate it back.
    exif = Image.Exif()
    exif[0x0112] = 8
    return encode(base_image().rotate(-90, expand=True), "JPEG", exif=exif, quality=92)


def sixteen_bit_png() -> bytes:
    import numpy as np

    grey = np.asarray(base_image().convert("L"), dtype=np.uint16) * 257
    return encode(Image.fromarray(grey))


GOOD = [
    pytest.param(lambda: encode(base_image(), "JPEG", quality=90), True, id="jpeg-baseline"),
    pytest.param(lambda: encode(base_image(), "JPEG", progressive=True), True, id="jpeg-progressive"),
    pytest.param(lambda: encode(base_image().convert("CMYK"), "JPEG"), True, id="jpeg-cmyk"),
    pytest.param(exif_rotated_jpeg, True, id="jpeg-exif-rotated"),
    pytest.param(lambda: encode(base_image().convert("L")), True, id="grayscale"),
    pytest.param(lambda: encode(base_image().convert("LA")), True, id="grayscale-alpha"),
    pytest.param(lambda: encode(base_image().convert("P")), True, id="palette"),
    pytest.param(lambda: encode(base_image().convert("RGBA")), True, id="rgba"),
    pytest.param(sixteen_bit_png, True, id="png-16-bit"),
    pytest.param(lambda: encode(base_image().convert("1")), False, id="1-bit"),
    pytest.param(lambda: encode(base_image(), "WEBP"), True, id="webp"),
    pytest.param(animated_gif, True, id="gif-animated-first-frame"),
    pytest.param(lambda: encode(base_image(), "BMP"), True, id="bmp"),
    pytest.param(lambda: encode(base_image(), "TIFF"), True, id="tiff"),
    pytest.param(lambda: encode(Image.new("RGB", (1, 1), (9, 9, 9))), False, id="1x1"),
    pytest.param(lambda: encode(Image.new("RGB", (8000, 16), (200, 10, 10))), False, id="8000x16"),
]


@pytest.mark.parametrize(("make", "same_label"), GOOD)
def test_unusual_images_succeed(server, make, same_label):
    reference = server.predict(data=encode(base_image()))
    assert reference.status_code == 200, reference.text
    response = server.predict(data=make(), headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) <= LABELS and all(0 <= v <= 1 for v in body.values()), body
    if same_label:  # the same picture in another encoding: the same answer
        assert next(iter(body)) == next(iter(reference.json())), (body, reference.json())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bomb_png() -> bytes:
    # 10,000 x 10,000 = 100 Mpx (limit 50 Mpx) that compresses to a few KB.
    return encode(Image.new("1", (10_000, 10_000), 0), optimize=True)


JPEG = encode(Image.new("RGB", (300, 300), (10, 120, 200)), "JPEG")
BAD = [
    pytest.param(dict(data=b"", headers={"Content-Type": "application/octet-stream"}), 400, id="empty-body"),
    pytest.param(dict(data=bytes(range(256)) * 8, headers={"Content-Type": "application/octet-stream"}), 400,
                 id="random-bytes"),
    pytest.param(dict(data="hello, not an image", headers={"Content-Type": "text/plain"}), 400, id="text"),
    pytest.param(dict(data=JPEG[: len(JPEG) // 2], headers={"Content-Type": "image/jpeg"}), 400,
                 id="truncated-jpeg"),
    pytest.param(dict(json={"images": ["!!!not base64!!!"]}), 400, id="invalid-base64"),
    pytest.param(dict(json={"pictures": [b64(JPEG)]}), 400, id="json-wrong-shape"),
    pytest.param(dict(json={"images": []}), 400, id="empty-image-list"),
    pytest.param(dict(data=None, files=None, json=None, _bomb=True), 413, id="decompression-bomb"),
    pytest.param(dict(json={"images": [b64(JPEG)] * 65}), 413, id="too-many-images"),
    pytest.param(dict(data=b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
                      headers={"Content-Type": "image/svg+xml"}), 400, id="svg"),
    pytest.param(dict(data=b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
                      headers={"Content-Type": "application/pdf"}), 400, id="pdf"),
    pytest.param(dict(files=[("a", ("a.jpg", JPEG, "image/jpeg")), ("b", ("b.jpg", b"", "image/jpeg"))]), 400,
                 id="zero-byte-multipart-field"),
    pytest.param(dict(data=b"--cut\r\nContent-Type: image/jpeg\r\n\r\n" + JPEG,  # no closing boundary
                      headers={"Content-Type": "multipart/mixed; boundary=cut"}), 400,
                 id="multipart-mixed-without-closing-boundary"),
    pytest.param(dict(data=b"--cut\r\n\r\n" + JPEG[: len(JPEG) // 2] + b"\r\n--cut--\r\n",
                      headers={"Content-Type": "multipart/mixed; boundary=cut"}), 400,
                 id="multipart-mixed-truncated-jpeg"),
]


@pytest.fixture(scope="module")
def worker_pid_before(server):
    """The backend worker's pid before the corpus: bad input must never crash it."""
    return [int(w["pid"]) for w in server.ready_workers("shapes")]


@pytest.mark.parametrize(("request_args", "status"), BAD)
def test_bad_requests_fail_alone(server, worker_pid_before, request_args, status):
    request_args = dict(request_args)
    if request_args.pop("_bomb", False):
        request_args = dict(data=bomb_png(), headers={"Content-Type": "image/png"})
    good = [shape_image(label, 400 + i) for i, label in enumerate(["circle", "square", "triangle"] * 2)]
    references = [server.predict(data=g).json() for g in good]
    with futures.ThreadPoolExecutor(8) as pool:
        # Good and bad requests at once, so that they share server-side batches.
        goods = [pool.submit(server.predict, data=g) for g in good[:3]]
        bad = pool.submit(server.predict, **request_args)
        goods += [pool.submit(server.predict, data=g) for g in good[3:]]
        bad_response = bad.result()
        good_responses = [f.result() for f in goods]
    assert bad_response.status_code == status, bad_response.text
    body = bad_response.json()
    assert body["error"] and body["message"] and isinstance(body["images"], list), body
    for response, reference in zip(good_responses, references):
        assert response.status_code == 200, response.text
        assert response.json() == pytest.approx(reference, abs=1e-3)


def test_body_above_the_request_size_cap_is_refused_by_the_frontend(server):
    too_big = b"\0" * (64 * 1024 * 1024 + 1024)  # config.properties: max_request_size=64 MiB
    response = server.predict(data=too_big, headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 413, response.text[:300]
    assert server.predict(data=shape_image("circle", 1)).status_code == 200


def test_server_answers_normally_after_the_corpus(server, worker_pid_before):
    images = [shape_image(label, 900 + i) for i, label in enumerate(["circle", "square", "triangle"])]
    response = server.predict(files=[(f"f{i}", data) for i, data in enumerate(images)])
    assert response.status_code == 200, response.text
    assert len(response.json()) == 3
    workers = [int(w["pid"]) for w in server.ready_workers("shapes")]
    assert workers == worker_pid_before, "the backend worker was restarted during the bad-input corpus"


def test_no_image_bytes_in_the_logs(server):
    logs = b"".join(p.read_bytes() for p in (server.workdir / "logs").glob("*.log"))
    assert logs, "no logs found"
    for marker in (JPEG[:12], b64(JPEG)[:24].encode(), b"\x89PNG", b"%PDF-1.4", b"<svg"):
        assert marker not in logs, marker
