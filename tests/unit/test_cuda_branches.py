"""The CUDA branches of the core, run on a CPU with small stand-ins (fake events, a fake cudart, a
decoder that counts, ``torch.cuda`` functions patched), so that a refactor cannot break the GPU
path unseen. ``test_cuda.py`` runs the same paths for real where there is a GPU."""

import io
import itertools
import logging
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import handler.decode.assemble
from handler.decode import gpu as gpu_decode
from handler.decode.assemble import DeviceBatches
from handler.classifier import ImageClassifier
from handler.config import HandlerConfig
from handler.decode.dataset import DecodedBatch, LoaderItem
from handler.devices import GPU_HOST_THREADS, autocast_dtype, copied_event, resolve_device, select_device, thread_budget
from handler.decode.gpu import BatchedJpegDecoder, JpegJob, jpeg_job
from handler.metrics import StageClock
from handler.decode.path import DecodePath
from handler.model.runner import ModelRunner
from handler.decode.shared_memory import PixelRing
from harness.ts_server import ROOT

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
TICKS = itertools.count()


class FakeEvent:
    """torch.cuda.Event: records a tick; elapsed_time is the ticks between two events."""

    made: list["FakeEvent"] = []

    def __init__(self, enable_timing: bool = False) -> None:
        self.enable_timing = enable_timing
        self.tick: int | None = None
        self.synchronized = 0
        FakeEvent.made.append(self)

    def record(self, stream=None) -> None:
        self.tick = next(TICKS)

    def synchronize(self) -> None:
        self.synchronized += 1

    def elapsed_time(self, end: "FakeEvent") -> float:
        assert self.enable_timing and end.enable_timing, "timing events must be created with enable_timing"
        assert self.tick is not None and end.tick is not None, "an event that was never recorded"
        return float(end.tick - self.tick)


@pytest.fixture
def fake_events(monkeypatch):
    FakeEvent.made = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    return FakeEvent.made


@pytest.fixture
def cuda_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


# ---- devices ------------------------------------------------------------------------------------


def test_device_choice_with_cuda(cuda_available):
    assert resolve_device("auto") == CUDA
    assert resolve_device("cuda") == CUDA
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda")) == CUDA
    assert select_device(3) == torch.device("cuda", 3)
    assert select_device("2") == torch.device("cuda", 2)  # TorchServe may hand the id as text
    assert select_device(None) == CPU


def test_device_choice_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    assert select_device(0) == CPU
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="CPU or a CUDA GPU"):
        resolve_device("meta")


def test_autocast_dtypes_per_device(caplog):
    assert autocast_dtype("fp16", CUDA) is torch.float16
    assert autocast_dtype("bf16", CUDA) is torch.bfloat16
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    assert autocast_dtype("fp32", CUDA) is None
    with caplog.at_level(logging.WARNING, logger="handler.devices"):
        assert autocast_dtype("fp16", CPU) is None
    assert "fp16 needs CUDA" in caplog.text


def test_a_gpu_process_keeps_few_torch_threads(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert thread_budget(0, 1, CUDA) == GPU_HOST_THREADS
    assert thread_budget(0, 1, CPU) == 16
    assert thread_budget(0, 4, CPU) == 4
    assert thread_budget(3, 1, CUDA) == 3  # as configured


def test_copied_event_is_recorded_on_cuda_and_absent_on_the_cpu(fake_events):
    event = copied_event(CUDA)
    assert isinstance(event, FakeEvent) and event.tick is not None  # recorded: marks the copies so far
    assert copied_event(CPU) is None and fake_events == [event]


# ---- pixel ring: page-locking and release events ------------------------------------------------


class FakeCudart:
    def __init__(self, error: int = 0) -> None:
        self.error = error
        self.registered: list[tuple[int, int, int]] = []
        self.unregistered: list[int] = []

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> int:
        self.registered.append((ptr, nbytes, flags))
        return self.error

    def cudaHostUnregister(self, ptr: int) -> int:
        self.unregistered.append(ptr)
        return 0


def test_the_ring_is_page_locked_once_and_unlocked_on_close(monkeypatch):
    cudart = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    ring = PixelRing(slots=2, capacity=2, image_size=4)
    ring.pin()
    ring.pin()
    assert cudart.registered == [(ring.pixels.data_ptr(), ring.pixels.nbytes, 1)] and ring.pinned
    ring.close()
    assert cudart.unregistered == [ring.pixels.data_ptr()] and not ring.pinned
    ring.close()  # once only
    assert len(cudart.unregistered) == 1


def test_a_ring_cuda_refuses_to_lock_stays_unpinned_with_a_warning(monkeypatch, caplog):
    cudart = FakeCudart(error=2)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    ring = PixelRing(slots=1, capacity=1, image_size=4)
    with caplog.at_level(logging.WARNING, logger="handler.decode.shared_memory"):
        ring.pin()
    assert not ring.pinned and "could not page-lock" in caplog.text
    ring.close()
    assert cudart.unregistered == []  # nothing to undo


def test_a_slot_is_reused_only_after_its_copy_event_completes():
    ring = PixelRing(slots=1, capacity=1, image_size=4)
    owner = DecodedBatch([0], None)
    _, release = ring.attach(ring.acquire(), 1, owner)
    event = FakeEvent()
    release(event)
    assert event.synchronized == 0  # releasing does not wait
    assert ring.acquire() == 0
    assert event.synchronized == 1  # handing the slot out again waits for the copy out of it
    ring.reclaim_pending()
    assert ring.acquire() == 0 and event.synchronized == 1  # that event is spent


def chunk(keys: list[int], released: list) -> DecodedBatch:
    batch = DecodedBatch(list(keys), None)
    batch.attach(torch.full((len(keys), 3, 2, 2), 7, dtype=torch.uint8), released.append)
    return batch


def test_device_batches_release_each_chunk_with_the_copy_event_of_their_device(monkeypatch):
    made = []

    def fake_copied_event(device):
        made.append(device)
        return f"event-{len(made)}"

    monkeypatch.setattr(handler.decode.assemble, "copied_event", fake_copied_event)
    released: list = []
    chunks = [chunk([0, 1], released), chunk([2, 3, 4, 5], released), chunk([6], released)]
    device = torch.device("cpu")
    out = list(DeviceBatches(chunks, size=4, device=device, normalize=lambda px: px.float()))
    assert [keys for keys, _ in out] == [[0, 1, 2, 3], [4, 5, 6]]
    assert released == ["event-1", "event-2", "event-3"] and made == [device] * 3


def test_device_batches_on_cuda_release_with_a_recorded_cuda_event(fake_events):
    """The CUDA branch of copied_event, reached through DeviceBatches: the chunk that is a full
    batch by itself and the one copied into the buffer are each released with a recorded event."""
    released: list = []
    batches = DeviceBatches([], size=2, device=CUDA, normalize=lambda px: px.float())
    assert batches._add(chunk([0, 1], released))[0][0] == [0, 1]
    assert len(released) == 1 and isinstance(released[0], FakeEvent) and released[0].tick is not None


# ---- stage timings on CUDA ----------------------------------------------------------------------


def test_stage_clock_on_cuda_times_with_events_and_synchronizes_once(fake_events):
    clock = StageClock(CUDA)
    with clock.device("HostToDeviceMs"):
        next(TICKS)  # one tick of "work" between the events
    with clock.device("InferenceMs"):
        next(TICKS), next(TICKS)
    start, end = FakeEvent(enable_timing=True), FakeEvent(enable_timing=True)
    start.record(), end.record()
    clock.add_events("DecodeTransformMs", start, end)
    assert clock.ms["InferenceMs"] == 0  # nothing is read before resolve: the GPU runs ahead
    clock.resolve()
    assert clock.ms["HostToDeviceMs"] == 2 and clock.ms["InferenceMs"] == 3 and clock.ms["DecodeTransformMs"] == 1
    assert [e.synchronized for e in fake_events] == [0, 0, 0, 0, 0, 1]  # only the last event, once
    clock.resolve()  # nothing pending: nothing added
    assert clock.ms["InferenceMs"] == 3


def test_nvjpeg_decode_time_is_device_time_of_decoding(fake_events, monkeypatch):
    """A nvJPEG list's timing events: started before the decode, ended after the resize, carried
    by its batch, and added to DecodeTransformMs by DeviceBatches once the clock resolves."""
    assert gpu_decode._recorded_events(CPU) is None
    start, end = gpu_decode._recorded_events(CUDA)
    assert start.enable_timing and end.enable_timing and start.tick is not None and end.tick is None
    # The decoder runs on the CPU here; its events are that CUDA pair.
    monkeypatch.setattr(gpu_decode, "_recorded_events", lambda device: (start, end))
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 30, 30)).save(buffer, format="JPEG")
    job = jpeg_job(LoaderItem(5, buffer.getvalue()), max_pixels=10**6)
    batch = BatchedJpegDecoder(HandlerConfig(image_size=16, resize_size=16), CPU).decode([job])
    assert batch.keys == [5] and batch.device_events == (start, end) and end.tick == start.tick + 1
    monkeypatch.setattr("handler.metrics.time", SimpleNamespace(perf_counter=lambda: 0.0))  # host stages: 0 ms
    clock = StageClock(CUDA)
    out = list(DeviceBatches([batch], size=1, device=CPU, normalize=lambda px: px.float(), clock=clock))
    assert [keys for keys, _ in out] == [[5]]
    clock.resolve()
    assert clock.ms["DecodeTransformMs"] == 1  # the decode's pair, once


# ---- the pipeline's CUDA set-up, nvJPEG routing and warm-up fallback ----------------------------


class FakeLoader:
    def __init__(self) -> None:
        self.pinned = 0
        self.decoded: list[list[int]] = []

    def pin_ring(self) -> None:
        self.pinned += 1

    def iterate(self, items):
        keys = [item.key for item in items]
        self.decoded.append(keys)
        return iter([DecodedBatch(keys, torch.zeros((len(keys), 3, 2, 2), dtype=torch.uint8))] if keys else [])


def stand_in(config: HandlerConfig, device: torch.device, **extra) -> SimpleNamespace:
    """The state DecodePath.__init__ leaves (a fake loader), without forking anything."""
    return SimpleNamespace(config=config, device=device, loader=FakeLoader(), jpeg_decoder=None, _normalize=None,
                           **extra)


@pytest.mark.parametrize("benchmark", [False, True], ids=["cudnn-fixed", "cudnn-benchmark"])
def test_setting_up_on_cuda_tunes_cudnn_pins_the_ring_and_makes_the_nvjpeg_decoder(monkeypatch, benchmark):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not benchmark)  # restored after the test
    monkeypatch.setattr("handler.decode.path.Normalizer", lambda mean, std, device: ("normalizer", device))
    config = HandlerConfig(decode_device="cuda", pin_memory=True, batch_size=8, batch_buckets=(8,), cudnn_benchmark=benchmark,
                           precision="fp16")
    decoding = stand_in(config, CUDA)
    DecodePath.attach(decoding)
    assert isinstance(decoding.jpeg_decoder, BatchedJpegDecoder) and decoding.jpeg_decoder.device == CUDA
    assert decoding.loader.pinned == 1 and decoding._normalize == ("normalizer", CUDA)
    runner = SimpleNamespace(config=config, device=CUDA, precision="fp16", autocast_dtype=None)
    ModelRunner._set_up_device(runner)
    assert torch.backends.cudnn.benchmark is benchmark and runner.autocast_dtype is torch.float16


def test_setting_up_without_pinning_or_nvjpeg(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr("handler.decode.path.Normalizer", lambda mean, std, device: "normalizer")
    decoding = stand_in(HandlerConfig(pin_memory=False), CUDA)
    DecodePath.attach(decoding)
    assert decoding.jpeg_decoder is None and decoding.loader.pinned == 0


def test_nvjpeg_asked_for_on_the_cpu_decodes_on_the_cpu(caplog):
    decoding = stand_in(HandlerConfig(decode_device="cuda"), CPU)
    with caplog.at_level(logging.WARNING, logger="handler.decode.path"):
        DecodePath.attach(decoding)
    assert decoding.jpeg_decoder is None
    assert "needs the model on a GPU" in caplog.text and decoding.loader.pinned == 0


class CountingDecoder:
    """Takes items whose bytes start with b"J" (JPEGs); rejects lists holding a key in ``reject``."""

    def __init__(self, reject: set[int] = frozenset()) -> None:
        self.reject = reject
        self.decoded: list[list[int]] = []
        self.ahead: list[bool] = []

    def split(self, items):
        jobs = [JpegJob(item, 1) for item in items if item.data.startswith(b"J")]
        return jobs, [item for item in items if not item.data.startswith(b"J")]

    def decode_lists(self, lists, ahead=True):
        self.ahead.append(ahead)
        for jobs in lists:
            keys = [job.item.key for job in jobs]
            if self.reject & set(keys):
                yield None
                continue
            self.decoded.append(keys)
            yield DecodedBatch(keys, torch.zeros((len(keys), 3, 2, 2), dtype=torch.uint8))


def route(items, decoder, **settings):
    config = HandlerConfig(batch_size=3, decode_device="cuda", **settings)
    decoding = stand_in(config, CPU)
    decoding.jpeg_decoder = decoder
    decoding._decode_on_device = lambda items: DecodePath._decode_on_device(decoding, items)
    keys = [key for batch in DecodePath.chunks(decoding, items) for key in batch.keys]
    return keys, decoding.loader.decoded


ITEMS = [LoaderItem(0, b"J0"), LoaderItem(1, b"P1"), LoaderItem(2, b"J2"), LoaderItem(3, b"J3"),
         LoaderItem(4, b"J4"), LoaderItem(5, b"P5"), LoaderItem(6, b"J6"), LoaderItem(7, b"J7")]


def test_jpegs_go_to_nvjpeg_in_model_batches_and_the_rest_to_the_workers():
    decoder = CountingDecoder()
    keys, cpu = route(ITEMS, decoder)
    assert decoder.decoded == [[0, 2, 3], [4, 6, 7]] and decoder.ahead == [True]
    assert cpu == [[1, 5]]
    assert sorted(keys) == list(range(8))  # every image exactly once


def test_cpu_decode_share_sends_that_share_of_the_jpegs_to_the_workers():
    decoder = CountingDecoder()
    keys, cpu = route(ITEMS, decoder, cpu_decode_share=0.5, decode_ahead=False)
    assert decoder.decoded == [[0, 2, 3]] and decoder.ahead == [False]
    assert cpu == [[1, 4, 5, 6, 7]]  # the last half of the JPEGs, with the others, in key order
    assert sorted(keys) == list(range(8))


def test_lists_nvjpeg_rejects_are_decoded_by_the_workers():
    decoder = CountingDecoder(reject={3})
    keys, cpu = route(ITEMS, decoder)
    assert decoder.decoded == [[4, 6, 7]]
    assert cpu == [[1, 5], [0, 2, 3]]  # the CPU's own first, then the rejected list
    assert sorted(keys) == list(range(8))


def test_without_a_jpeg_decoder_everything_goes_to_the_workers():
    decoding = stand_in(HandlerConfig(), CPU)
    keys = [key for batch in DecodePath.chunks(decoding, ITEMS) for key in batch.keys]
    assert keys == list(range(8)) and decoding.loader.decoded == [list(range(8))]


def test_warm_up_falls_back_to_cpu_decoding_when_nvjpeg_does_not_work(caplog):
    decoding = stand_in(HandlerConfig(), CPU)
    decoding.jpeg_decoder = SimpleNamespace(warm_up=lambda: False)
    with caplog.at_level(logging.WARNING, logger="handler.decode.path"):
        DecodePath.warm_up(decoding)
    assert decoding.jpeg_decoder is None and "decoding every image on the CPU" in caplog.text
    working = SimpleNamespace(warm_up=lambda: True)
    decoding.jpeg_decoder = working
    DecodePath.warm_up(decoding)
    assert decoding.jpeg_decoder is working


def test_warming_the_model_runs_the_buckets_not_compiled_already():
    ran: list = []
    runner = SimpleNamespace(config=HandlerConfig(batch_size=8, batch_buckets=(4, 8)), compiled_buckets=(8,),
                             precision="fp32", _compile=lambda normalize: ran.append("compile"),
                             _run_buckets=lambda buckets, normalize: ran.append(buckets))
    ModelRunner._warm_model(runner, lambda pixels: pixels)
    assert ran == ["compile", (4,)]  # the compiled bucket is not run again


# ---- a compiled model's outputs are kept as copies ---------------------------------------------


class BufferModel(torch.nn.Module):
    """Like a CUDA-graph compiled model: every call writes one persistent output buffer and
    returns a view of it, which the next call overwrites."""

    def __init__(self, fresh: bool = False) -> None:
        super().__init__()
        self.fresh = fresh
        self.buffer: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x.mean(dim=(2, 3)) * 10  # 3 channels -> 3 classes: the dominant colour wins
        if self.fresh:
            return logits
        if self.buffer is None or self.buffer.shape != logits.shape:
            self.buffer = torch.empty_like(logits)
        self.buffer.copy_(logits)
        return self.buffer


def colour(i: int) -> torch.Tensor:
    rgb = [(250, 10, 10), (10, 250, 10), (10, 10, 250)][i % 3]
    return torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, 40, 40).contiguous()


def test_outputs_of_a_compiled_model_survive_later_batches():
    overrides = {"batch_size": 2, "num_workers": 0, "compile": False, "max_image_pixels": 1_000_000}
    with ImageClassifier.load(ROOT / "models" / "shapes", device="cpu", overrides=overrides) as clf:
        pipeline = clf.pipeline
        images = [colour(i) for i in range(7)]  # batches of 2, 2, 2 and 1 (padded to the bucket of 2)

        def top1(model):
            pipeline.runner.compiled, pipeline.runner.compiled_buckets = model, (2,)
            return [next(iter(p)) for p in clf.classify(images)]

        want = top1(BufferModel(fresh=True))
        got = top1(BufferModel())
        with torch.inference_mode():  # as Pipeline.run calls it
            kept = [pipeline.forward(pipeline.to_model_input(colour(i)[None])) for i in range(3)]
    assert want == [clf.labels[i % 3] for i in range(7)]  # each colour its own class
    assert got == want
    assert [int(k.argmax()) for k in kept] == [0, 1, 2]  # earlier results not overwritten
