import time

import torch

from handler.metrics import StageClock


class FakeEvent:
    """Stands in for a CUDA timing event: a time stamp, and whether anyone waited for it."""

    def __init__(self, at_ms: float) -> None:
        self.at_ms, self.waited = at_ms, False

    def synchronize(self) -> None:
        self.waited = True

    def elapsed_time(self, end: "FakeEvent") -> float:
        return end.at_ms - self.at_ms


def test_host_and_cpu_device_stages_accumulate_wall_time():
    clock = StageClock(torch.device("cpu"))
    for _ in range(2):
        with clock.host("DecodeTransformMs"):
            time.sleep(0.01)
        with clock.device("InferenceMs"):
            time.sleep(0.005)
    clock.resolve()
    assert clock.ms["DecodeTransformMs"] >= 20 and clock.ms["InferenceMs"] >= 10
    assert clock.ms["HostToDeviceMs"] == 0


def test_device_events_are_added_once_after_one_wait():
    clock = StageClock(torch.device("cpu"))
    first, last = (FakeEvent(0), FakeEvent(4.5)), (FakeEvent(10), FakeEvent(12))
    clock.add_events("DecodeTransformMs", *first)
    clock.add_events("DecodeTransformMs", *last)
    clock.resolve()
    clock.resolve()  # nothing pending any more: no double counting
    assert clock.ms["DecodeTransformMs"] == 6.5
    assert last[1].waited and not first[1].waited  # the last event implies the earlier ones


def test_torchserve_declares_every_metric_the_doors_define():
    """metrics.yaml (what TorchServe accepts) names exactly the metrics handler.telemetry defines,
    each with its kind."""
    from pathlib import Path

    import yaml

    from handler.telemetry import torchserve_names

    declared = yaml.safe_load((Path(__file__).resolve().parents[2] / "metrics.yaml").read_text())["model_metrics"]
    found = {entry["name"]: kind for kind, entries in declared.items() for entry in entries}
    assert found == torchserve_names()
