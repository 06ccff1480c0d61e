import base64
import json

import pytest

from handler.errors import RequestError
from handler.protocols import ParsedRequest, PlainJson, decode_base64, parse_request
from handler.protocols.kserve_v1 import V1Encoder
from handler.protocols.kserve_v2 import V2Encoder
from handler.doors.torchserve_io import incoming, natural_key, request_headers

PNG = b"\x89PNG fake but non-empty"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


HTTP = {"host": "localhost"}  # every HTTP request carries at least Host; a gRPC call carries nothing


def parse_row(row, max_images: int, headers) -> ParsedRequest | RequestError:
    """A TorchServe row as the serving loop decodes it: its images, or the RequestError that
    rejects it."""
    item = incoming(row, headers)
    if isinstance(item, RequestError):
        return item
    try:
        return parse_request(item[0], max_images=max_images, headers=item[1])
    except RequestError as exc:
        return exc


def parsed_row(row, max_images: int) -> ParsedRequest:
    """parse_row, with the RequestError it returns raised."""
    parsed = parse_row(row, max_images, HTTP)
    if isinstance(parsed, RequestError):
        raise parsed
    return parsed


def described(parsed: ParsedRequest) -> list[tuple[int, str | None, bytes]]:
    return [(i, image.field, image.data) for i, image in enumerate(parsed.images)]


def as_list(parsed: ParsedRequest) -> bool:
    assert isinstance(parsed.encoder, PlainJson), parsed.encoder
    return parsed.encoder.as_list


def test_raw_body_is_one_image_answered_as_object():
    parsed = parsed_row({"body": bytearray(PNG)}, max_images=4)
    assert described(parsed) == [(0, None, PNG)]
    assert as_list(parsed) is False


def test_multipart_fields_keep_their_order_and_names():
    row = {"b": bytearray(b"2"), "a": bytearray(b"1"), "c": bytearray(b"3")}
    parsed = parsed_row(row, max_images=4)
    assert described(parsed) == [(0, "b", b"2"), (1, "a", b"1"), (2, "c", b"3")]
    assert as_list(parsed) is True


def test_single_multipart_file_is_answered_as_object():
    assert as_list(parsed_row({"data": bytearray(PNG)}, max_images=4)) is False


def test_json_images_list():
    parsed = parsed_row({"body": {"images": [b64(b"x"), b64(b"yz")]}}, max_images=4)
    assert [i.data for i in parsed.images] == [b"x", b"yz"]
    assert as_list(parsed) is True


def test_json_data_is_one_image():
    parsed = parsed_row({"body": {"data": b64(PNG)}}, max_images=4)
    assert [i.data for i in parsed.images] == [PNG] and as_list(parsed) is False


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(bytearray(b'{"images": ["eA==", "eXo="]}'), id="octet-stream-bytes"),
        pytest.param(' \n{"images": ["eA==", "eXo="]}', id="text-plain-with-leading-blanks"),
    ],
)
def test_json_sent_without_its_content_type_is_read_as_json(body):
    parsed = parsed_row({"body": body}, max_images=4)
    assert [i.data for i in parsed.images] == [b"x", b"yz"] and as_list(parsed) is True


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"{" + bytes(range(256)) * 4, id="starts-like-json-but-binary"),
        pytest.param(b"[not json at all", id="starts-with-bracket"),
    ],
)
def test_bytes_that_only_look_like_json_stay_an_image(body):
    parsed = parsed_row({"body": bytearray(body)}, max_images=4)
    assert [i.data for i in parsed.images] == [body] and as_list(parsed) is False


def test_json_text_that_is_not_an_object_is_a_400_that_says_so():
    with pytest.raises(RequestError) as caught:
        parsed_row({"body": "[1, 2]"}, max_images=4)
    assert (caught.value.status, caught.value.code) == (400, "invalid_json")


def test_images_list_items_may_be_wrapped_like_kserve_v1():
    parsed = parsed_row({"body": {"images": [{"b64": b64(b"a")}, b64(b"b"), {"data": b64(b"c")}]}}, max_images=4)
    assert [i.data for i in parsed.images] == [b"a", b"b", b"c"]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("data:image/png;base64," + b64(PNG), id="data-url"),
        pytest.param(b64(PNG)[:10] + "\n" + b64(PNG)[10:], id="line-break"),
        pytest.param(base64.urlsafe_b64encode(b"\xfb\xff" * 5).decode(), id="urlsafe"),
        pytest.param(b64(PNG).rstrip("="), id="no-padding"),
    ],
)
def test_base64_variants_are_accepted(text):
    assert decode_base64(text) in (PNG, b"\xfb\xff" * 5)


@pytest.mark.parametrize(
    ("row", "status", "code"),
    [
        pytest.param({}, 400, "empty_request", id="no-body"),
        pytest.param({"body": "hello"}, 400, "unsupported_content", id="text-body"),
        pytest.param({"body": [1, 2]}, 400, "invalid_json", id="json-list"),
        pytest.param({"body": {"pictures": []}}, 400, "invalid_json", id="json-wrong-key"),
        pytest.param({"body": {"images": "abc"}}, 400, "invalid_json", id="images-not-list"),
        pytest.param({"body": {"images": []}}, 400, "no_images", id="empty-list"),
        pytest.param({"body": {"images": ["@@not base64@@"]}}, 400, "invalid_base64", id="bad-base64"),
        pytest.param({"body": {"images": [5]}}, 400, "invalid_base64", id="number-not-string"),
        pytest.param({"body": bytearray()}, 400, "empty_image", id="zero-byte-body"),
        pytest.param({"a": bytearray(b"x"), "b": bytearray()}, 400, "empty_image", id="zero-byte-field"),
        pytest.param({"a": bytearray(b"x"), "b": "text"}, 400, "invalid_field", id="text-field"),
        pytest.param({'{"images": ["YWI': bytearray(b'="]}')}, 400, "form_encoded_json", id="json-as-urlencoded-form"),
        pytest.param({"body": {"images": [b64(b"x")] * 5}}, 413, "too_many_images", id="too-many"),
    ],
)
def test_bad_requests_are_rejected(row, status, code):
    with pytest.raises(RequestError) as caught:
        parsed_row(row, max_images=4)
    assert (caught.value.status, caught.value.code) == (status, code), caught.value


def test_error_names_each_bad_image():
    with pytest.raises(RequestError) as caught:
        parsed_row({"body": {"images": [b64(b"ok"), "%%%", b64(b"ok"), "!!"]}}, max_images=8)
    body = caught.value.as_json()
    assert [(p["index"], p["field"]) for p in body["images"]] == [(1, "images"), (3, "images")]
    assert body["error"] == "invalid_base64" and body["message"]


def test_kserve_v1_instances_in_every_form():
    row = {"body": {"instances": [{"b64": b64(b"a")}, {"data": b64(b"b")}, b64(b"c")]}}
    parsed = parsed_row(row, max_images=8)
    assert [i.data for i in parsed.images] == [b"a", b"b", b"c"]
    assert parsed.encoder == V1Encoder()


def test_kserve_v2_reads_every_element_of_every_input():
    row = {"body": {"id": "r1", "inputs": [
        {"name": "x", "shape": [2], "datatype": "BYTES", "data": [b64(b"a"), b64(b"b")]},
        {"name": "y", "shape": [1], "datatype": "BYTES", "data": [b64(b"c")]},
    ]}}
    parsed = parsed_row(row, max_images=8)
    assert described(parsed) == [(0, "x", b"a"), (1, "x", b"b"), (2, "y", b"c")]
    assert parsed.encoder == V2Encoder("r1")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"instances": "x"}, id="v1-not-list"),
        pytest.param({"inputs": [{"name": "x", "datatype": "FP32", "data": [1.0]}]}, id="v2-not-bytes"),
        pytest.param({"inputs": {"name": "x"}}, id="v2-not-list"),
    ],
)
def test_malformed_kserve_bodies_are_400(body):
    with pytest.raises(RequestError) as caught:
        parsed_row({"body": body}, max_images=8)
    assert caught.value.status == 400 and caught.value.code == "invalid_json"


def mixed_body(parts: list[tuple[str | None, bytes]], boundary: str = "b0undary") -> bytes:
    """A multipart/mixed body as clients build it (a name per part where given)."""
    out = b""
    for name, data in parts:
        out += f"--{boundary}\r\n".encode()
        if name is not None:
            out += f'Content-Disposition: form-data; name="{name}"; filename="{name}.jpg"\r\n'.encode()
            out += b"Content-Type: image/jpeg\r\n"
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_a_multipart_mixed_body_is_split_into_named_images_in_order():
    # Image bytes that hold CRLF and dashes, even the boundary without its leading CRLF.
    tricky = b"\xff\xd8\r\n--b0undar\r\n--b0undary-ish"
    parsed = parsed_row({"body": bytearray(mixed_body([("z", tricky), ("a", PNG), (None, b"3")]))}, 4)
    assert described(parsed) == [(0, "z", tricky), (1, "a", PNG), (2, None, b"3")]
    assert as_list(parsed) is True


def test_a_multipart_mixed_body_with_one_part_is_answered_as_object():
    parsed = parsed_row({"body": bytearray(mixed_body([("only", PNG)]))}, max_images=4)
    assert [i.data for i in parsed.images] == [PNG] and as_list(parsed) is False


def test_multipart_mixed_is_matched_against_the_limits_like_any_request():
    with pytest.raises(RequestError) as too_many:
        parsed_row({"body": bytearray(mixed_body([(f"f{i}", PNG) for i in range(5)]))}, max_images=4)
    assert too_many.value.status == 413
    with pytest.raises(RequestError) as empty:
        parsed_row({"body": bytearray(mixed_body([("a", PNG), ("b", b"")]))}, max_images=4)
    assert empty.value.code == "empty_image" and [p.field for p in empty.value.images] == ["b"]


@pytest.mark.parametrize("body", [
    mixed_body([("a", PNG)])[:-14],  # the closing boundary is cut off
    b"--b0undary\r\nContent-Type: image/png" + PNG + b"\r\n--b0undary--",  # headers never end
    b"--\r\n" + PNG,  # no boundary
    b"--" + b"x" * 80 + b"\r\n\r\n" + PNG,  # a boundary longer than RFC 2046 allows
])
def test_a_broken_multipart_body_is_a_400_that_says_so(body):
    with pytest.raises(RequestError) as error:
        parsed_row({"body": bytearray(body)}, max_images=4)
    assert error.value.status == 400 and error.value.code == "invalid_multipart", error.value


def test_a_long_field_name_is_shortened_in_the_error_body():
    name = "x" * 5000
    with pytest.raises(RequestError) as caught:
        parsed_row({name: bytearray(), "b": bytearray(b"1")}, max_images=4)
    (problem,) = caught.value.as_json()["images"]
    assert problem["field"].startswith("xxx") and len(problem["field"]) < 120


def test_grpc_inputs_are_answered_in_the_natural_order_of_their_names_http_parts_in_their_own():
    names = ["img10", "img2", "img0", "img1", "img11", "img3"]
    row = {name: bytearray(name.encode()) for name in names}
    grpc = parse_row(row, 16, {})
    assert [i.field for i in grpc.images] == ["img0", "img1", "img2", "img3", "img10", "img11"]
    assert [i.data for i in grpc.images] == [b"img0", b"img1", b"img2", b"img3", b"img10", b"img11"]
    assert [i.field for i in parse_row(row, 16, HTTP).images] == names  # multipart keeps part order
    assert sorted(["10", "9", "0", "b2", "a10", "a9"], key=natural_key) == ["0", "9", "10", "a9", "a10", "b2"]


def test_request_headers_are_the_http_ones_only():
    class Context:
        def get_all_request_header(self, idx):
            return [{"img0": {"content-type": ""}}, {"body": {"content-type": ""}, "Host": "h", "X-A": "1"}][idx]

    assert request_headers(Context(), 0) == {}  # what a gRPC call looks like
    assert request_headers(Context(), 1) == {"host": "h", "x-a": "1"}
    assert request_headers(object(), 0) == {}


def binary_v2(elements_per_input: list[list[bytes]], **extra) -> tuple[bytes, dict[str, str]]:
    """A request as tritonclient sends it with binary_data=True."""
    from handler.protocols.kserve_v2 import serialize_bytes

    raws = [serialize_bytes(elements) for elements in elements_per_input]
    inputs = [{"name": f"in{i}", "shape": [len(e)], "datatype": "BYTES", "parameters": {"binary_data_size": len(r)}}
              for i, (e, r) in enumerate(zip(elements_per_input, raws))]
    header = json.dumps({"inputs": inputs, **extra}).encode()
    return header + b"".join(raws), {**HTTP, "inference-header-content-length": str(len(header))}


def test_binary_v2_bytes_inputs_are_read_element_by_element():
    body, headers = binary_v2([[b"a", PNG], [b"\xff\xd8x"]], id="r7", parameters={"binary_data_output": True})
    parsed = parse_row({"body": bytearray(body)}, 8, headers)
    assert [(i.field, i.data) for i in parsed.images] == [("in0", b"a"), ("in0", PNG), ("in1", b"\xff\xd8x")]
    assert parsed.encoder == V2Encoder("r7", binary=True)
    plain, plain_headers = binary_v2([[PNG]])
    assert parse_row({"body": bytearray(plain)}, 8, plain_headers).encoder == V2Encoder(None, binary=False)


@pytest.mark.parametrize("damage", ["header-too-long", "cut-element", "trailing-bytes", "not-a-number", "fp32"])
def test_a_broken_binary_v2_body_is_a_400_that_says_why(damage):
    body, headers = binary_v2([[PNG, PNG]])
    length = int(headers["inference-header-content-length"])
    if damage == "header-too-long":
        headers["inference-header-content-length"] = str(len(body) + 1)
    elif damage == "cut-element":
        body = body[:-3]
    elif damage == "trailing-bytes":
        body += b"xx"
    elif damage == "not-a-number":
        headers["inference-header-content-length"] = "lots"
    elif damage == "fp32":
        body = body.replace(b'"BYTES"', b'"FP32" ', 1)
    result = parse_row({"body": bytearray(body)}, 8, headers)
    assert isinstance(result, RequestError) and result.status == 400, result
    assert result.code == "invalid_binary_tensor", (result.code, result.message, length)


def test_v2_binary_output_is_a_json_header_then_the_bytes_tensor():
    import struct

    reply = V2Encoder("r1", binary=True).encode([{"a": 0.9}, {"b": 1.0}], "m")
    (length,) = [int(v) for k, v in reply.headers if k == "Inference-Header-Content-Length"]
    header = json.loads(reply.body[:length])
    (output,) = header["outputs"]
    assert header["id"] == "r1" and output["name"] == "predictions" and output["shape"] == [2]
    raw = reply.body[length:]
    assert output["parameters"]["binary_data_size"] == len(raw) and reply.content_type == "application/octet-stream"
    first = struct.unpack_from("<I", raw)[0]
    assert json.loads(raw[4 : 4 + first]) == {"a": 0.9} and json.loads(raw[8 + first :]) == {"b": 1.0}


def test_asking_for_an_output_this_model_does_not_have_is_a_400():
    body = {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [b64(PNG)]}],
            "outputs": [{"name": "probabilities"}]}
    result = parse_row({"body": body}, 8, HTTP)
    assert isinstance(result, RequestError) and "unknown output 'probabilities'" in result.message
