import json

from handler.decode import ParsedRequest, RawImage
from handler.responses import success_body

RESULTS = [{"circle": 0.9, "square": 0.1}, {"square": 0.7, "circle": 0.3}]


def request(protocol: str, as_list: bool = True, request_id=None) -> ParsedRequest:
    return ParsedRequest([RawImage(0, None, b"x")], as_list, protocol, request_id)


def test_plain_one_image_is_an_object_and_a_list_stays_a_list():
    assert json.loads(success_body(request("plain", as_list=False), RESULTS[:1], "m")) == RESULTS[0]
    assert json.loads(success_body(request("plain"), RESULTS[:1], "m")) == RESULTS[:1]


def test_kserve_v1_envelope():
    assert json.loads(success_body(request("kserve_v1"), RESULTS, "m")) == {"predictions": RESULTS}


def test_kserve_v2_envelope_keeps_order_and_id():
    body = json.loads(success_body(request("kserve_v2", request_id="r9"), RESULTS, "shapes"))
    assert body["model_name"] == "shapes" and body["id"] == "r9"
    (output,) = body["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [2]
    assert [json.loads(d) for d in output["data"]] == RESULTS
