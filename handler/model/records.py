"""Gate records: what an accuracy gate measured for one model's weights, and what may run on it.

A gate record (``gate_record.json`` beside the weights, in a model folder or an archive) holds,
for the weights whose SHA-256 it names, the top-1 accuracy of fp32 and of each candidate
(precision × runtime) on labelled held-out images, as served, and whether each candidate passed
(``MAX_DROP_POINTS``). ``precision: auto`` runs a reduced precision only where a record for these
very weights says it passed; the int8 program is trusted only with a record of the same weights.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from handler.model.zoo import ZooFiles

GATE_RECORD = "gate_record.json"
# A candidate whose top-1 accuracy is more than this many points below fp32's fails the gate.
MAX_DROP_POINTS = 0.5
# The one-sided z of the upper bound reported beside the drop (95 %).
BOUND_Z = 1.645


def artifact_sha256(*parts: Path | bytes) -> str:
    """The SHA-256 of an int8 model: its file(s) or their bytes, in order."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.read_bytes())
    return digest.hexdigest()


def weights_sha256(weights: Path | bytes | ZooFiles) -> str:
    """The SHA-256 (hex) of the weights: a file, its bytes, or a zoo folder's weights file."""
    if isinstance(weights, ZooFiles):
        weights = weights.files[weights.weights_name]
    digest = hashlib.sha256()
    if isinstance(weights, bytes):
        digest.update(weights)
    else:
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Candidate:
    """One precision × runtime against fp32 on the same labelled images.

    Attributes:
        precision, runtime: what ran (``bf16`` / ``int8``; ``torch`` / ``openvino``).
        top1: its top-1 accuracy (0..1).
        worse, better: images fp32 got right and this got wrong, and the reverse.
        confident_flips: images fp32 answered with probability >= 0.5 whose top-1 this changed.
        drop_points: fp32's accuracy minus this one's, in points (100 × fraction).
        drop_bound_points: the 95 % one-sided upper bound of that drop (paired, normal approx.).
        passed: drop_points <= MAX_DROP_POINTS.
        artifact_sha256: for int8, the SHA-256 of the int8 model measured (``artifact_sha256``):
            only that very model is trusted, not another made later from the same weights.
    """

    precision: str
    runtime: str
    top1: float
    worse: int
    better: int
    confident_flips: int
    drop_points: float
    drop_bound_points: float
    passed: bool
    artifact_sha256: str = ""

    @property
    def key(self) -> str:
        return f"{self.runtime}/{self.precision}"

    def summary(self, images: int, fp32_top1: float) -> str:
        """One line: the figures and how many images back them."""
        return (f"{self.runtime} {self.precision}: top-1 {self.top1:.1%} against fp32's {fp32_top1:.1%} on {images} "
                f"labelled images: a drop of {self.drop_points:+.2f} points (95 % upper bound {self.drop_bound_points:.2f}; "
                f"{self.worse} answers lost, {self.better} gained, {self.confident_flips} confident answers changed); "
                f"the gate allows {MAX_DROP_POINTS}")


def compare(precision: str, runtime: str, truth: list[int], reference: list[tuple[int, float]],
            candidate: list[int], artifact: str = "") -> Candidate:
    """The candidate's figures: ``truth`` the labels, ``reference`` fp32's (top-1, its probability)
    and ``candidate`` the candidate's top-1, per image; ``artifact`` the int8 model's SHA-256."""
    n = len(truth)
    if not n or len(reference) != n or len(candidate) != n:
        raise ValueError("compare needs one reference and one candidate answer per labelled image")
    ref_right = [r == t for (r, _), t in zip(reference, truth)]
    got_right = [c == t for c, t in zip(candidate, truth)]
    worse = sum(r and not g for r, g in zip(ref_right, got_right))
    better = sum(g and not r for r, g in zip(ref_right, got_right))
    confident = sum(p >= 0.5 and r != c for (r, p), c in zip(reference, candidate))
    drop = (worse - better) / n
    spread = math.sqrt(max(worse + better - (worse - better) ** 2 / n, 0.0)) / n
    drop_points = round(100 * drop, 3)
    return Candidate(precision, runtime, sum(got_right) / n, worse, better, confident, drop_points,
                     round(100 * (drop + BOUND_Z * spread), 3), drop_points <= MAX_DROP_POINTS, artifact)


@dataclass(frozen=True)
class GateRecord:
    """What the gate measured for one set of weights (see the module docstring)."""

    weights_sha256: str
    images: int
    source: str
    fp32_top1: float
    candidates: tuple[Candidate, ...] = field(default=())

    def passed(self, precision: str, runtime: str, artifact: str | None = None) -> Candidate | None:
        """The candidate ``runtime/precision`` if it was gated and passed (and, given ``artifact``,
        measured that very int8 model), else None."""
        return next((c for c in self.candidates if c.precision == precision and c.runtime == runtime and c.passed
                     and (artifact is None or c.artifact_sha256 == artifact)), None)

    def failed(self, precision: str, runtime: str) -> Candidate | None:
        """The candidate ``runtime/precision`` if it was gated and failed, else None."""
        return next((c for c in self.candidates if c.precision == precision and c.runtime == runtime
                     and not c.passed), None)

    def to_json(self) -> str:
        data = asdict(self)
        data["max_drop_points"] = MAX_DROP_POINTS
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = GATE_RECORD) -> "GateRecord":
        """Parse a record; ValueError naming ``where`` when it is not one."""
        try:
            data: dict[str, Any] = json.loads(text)
            candidates = tuple(Candidate(**c) for c in data["candidates"])
            if not all(isinstance(c.passed, bool) for c in candidates):
                raise TypeError("'passed' must be true or false")
            return cls(str(data["weights_sha256"]), int(data["images"]), str(data["source"]),
                       float(data["fp32_top1"]), candidates)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{where} is not a gate record ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class ModelArtifacts:
    """What was made from the weights at archive time, each trusted only with a gate record of
    the same weights.

    Attributes:
        int8_program: torch's PT2E int8 program (its file, or bytes out of a .mar).
        openvino_int8: OpenVINO's int8 model (graph and weights: files, or bytes).
        gate_record: what the accuracy gate measured for these weights.
    """

    int8_program: Path | bytes | None = None
    openvino_int8: tuple[Path | bytes, Path | bytes] | None = None
    gate_record: GateRecord | None = None

    def int8_sha256(self, runtime: str) -> str | None:
        """The SHA-256 of ``runtime``'s int8 model, or None when there is none."""
        if runtime == "openvino":
            return artifact_sha256(*self.openvino_int8) if self.openvino_int8 is not None else None
        return artifact_sha256(self.int8_program) if self.int8_program is not None else None
