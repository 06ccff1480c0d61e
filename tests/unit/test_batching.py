from handler.batching import Outcomes, flatten, split
from handler.decode import ParsedRequest, RawImage
from handler.errors import BadRequest, RequestError


def request(*payloads: bytes) -> ParsedRequest:
    return ParsedRequest([RawImage(i, None, p) for i, p in enumerate(payloads)], as_list=len(payloads) > 1)


def test_flatten_numbers_images_across_requests_and_skips_failed_ones():
    failed = BadRequest("x", "y")
    flat = flatten([request(b"a", b"b"), failed, request(b"c")])
    assert [i.data for i in flat.items] == [b"a", b"b", b"c"]
    assert [i.key for i in flat.items] == [0, 1, 2]
    assert flat.keys_by_request == {0: [0, 1], 2: [2]}


def test_split_returns_each_requests_results_in_order():
    requests = [request(b"a", b"b", b"c"), request(b"d"), request(b"e", b"f")]
    flat = flatten(requests)
    outcomes: Outcomes[str] = Outcomes(results={k: f"r{k}" for k in range(6)})
    assert split(flat, outcomes, 3) == [["r0", "r1", "r2"], ["r3"], ["r4", "r5"]]


def test_a_bad_image_fails_only_its_request_and_names_the_image():
    requests = [request(b"a", b"b"), request(b"c")]
    flat = flatten(requests)
    outcomes: Outcomes[str] = Outcomes(results={0: "r0", 2: "r2"}, failures={1: (400, "corrupt")})
    first, second = split(flat, outcomes, 2)
    assert isinstance(first, RequestError) and first.status == 400
    assert [(p.index, p.reason) for p in first.images] == [(1, "corrupt")]
    assert second == ["r2"]


def test_an_oversized_image_makes_the_request_413():
    flat = flatten([request(b"a", b"b")])
    outcomes: Outcomes[str] = Outcomes(failures={0: (400, "corrupt"), 1: (413, "too many pixels")})
    (result,) = split(flat, outcomes, 1)
    assert isinstance(result, RequestError) and result.status == 413 and len(result.images) == 2


def test_positions_that_failed_before_decoding_stay_none():
    flat = flatten([BadRequest("x", "y"), request(b"a")])
    assert split(flat, Outcomes(results={0: "r0"}), 2) == [None, ["r0"]]
