import json

from handler.protocols import PlainJson, error_reply
from handler.errors import ImageError, RequestError
from handler.protocols.kserve_v1 import V1Encoder
from handler.protocols.kserve_v2 import V2Encoder

RESULTS = [{"circle": 0.9, "square": 0.1}, {"square": 0.7, "circle": 0.3}]


def test_plain_one_image_is_an_object_and_a_list_stays_a_list():
    assert json.loads(PlainJson(as_list=False).encode(RESULTS[:1], "m").body) == RESULTS[0]
    assert json.loads(PlainJson(as_list=True).encode(RESULTS[:1], "m").body) == RESULTS[:1]


def test_kserve_v1_envelope():
    assert json.loads(V1Encoder().encode(RESULTS, "m").body) == {"predictions": RESULTS}


def test_kserve_v2_envelope_keeps_order_and_id():
    reply = V2Encoder("r9").encode(RESULTS, "shapes")
    body = json.loads(reply.body)
    assert reply.content_type == "application/json"
    assert body["model_name"] == "shapes" and body["id"] == "r9"
    (output,) = body["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [2]
    assert [json.loads(d) for d in output["data"]] == RESULTS


def test_an_error_body_names_each_bad_image_and_its_status_comes_from_the_code():
    error = RequestError("invalid_image", "1 image could not be decoded",
                         [ImageError("invalid_image", "not a recognised image format", 1, "b")])
    assert error.status == 400 and RequestError("too_many_images", "x").status == 413
    assert ImageError("image_too_large", "big").status == 413
    assert json.loads(error_reply(error).body) == {
        "error": "invalid_image", "message": "1 image could not be decoded",
        "images": [{"index": 1, "field": "b", "reason": "not a recognised image format"}]}
