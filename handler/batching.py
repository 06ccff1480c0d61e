"""Flatten a server-side batch of requests into one list of images, and split results back.

Every image of every good request gets a global key (its position in the flat list). Results
and per-image failures are recorded by key and then regrouped per request, in input order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from handler.decode import ParsedRequest, RawImage
from handler.dataset import LoaderItem
from handler.errors import ImageProblem, RequestError, error_for_images

T = TypeVar("T")


@dataclass
class FlatBatch:
    """The images of all servable requests, with the way back to their requests."""

    items: list[LoaderItem]
    origin: list[tuple[int, RawImage]]  # key -> (request position, image)
    keys_by_request: dict[int, list[int]]


def flatten(requests: list[ParsedRequest | RequestError]) -> FlatBatch:
    """One LoaderItem per image of each parsed request; failed requests contribute none."""
    items: list[LoaderItem] = []
    origin: list[tuple[int, RawImage]] = []
    keys_by_request: dict[int, list[int]] = {}
    for position, request in enumerate(requests):
        if isinstance(request, RequestError):
            continue
        keys = keys_by_request.setdefault(position, [])
        for image in request.images:
            keys.append(len(items))
            items.append(LoaderItem(len(items), image.data))
            origin.append((position, image))
    return FlatBatch(items, origin, keys_by_request)


@dataclass
class ScoredBatch(Generic[T]):
    """What is left of a loader batch after the model ran on it: its keys, its failures and the
    model's output for the good images (None when it had none). The pixels are already gone."""

    keys: list[int]
    failures: dict[int, tuple[int, str]]
    outputs: T | None


@dataclass
class Outcomes(Generic[T]):
    """Per-key results and failures, filled batch by batch."""

    results: dict[int, T] = field(default_factory=dict)
    failures: dict[int, tuple[int, str]] = field(default_factory=dict)


def split(flat: FlatBatch, outcomes: Outcomes[T], count: int) -> list[list[T] | RequestError | None]:
    """Per request position: its results in order, a RequestError naming its bad images, or
    None for a position that was not in the flat batch (it failed before decoding)."""
    grouped: list[list[T] | RequestError | None] = [None] * count
    for position, keys in flat.keys_by_request.items():
        problems = [
            ImageProblem(flat.origin[k][1].index, flat.origin[k][1].field, outcomes.failures[k][1],
                         outcomes.failures[k][0])
            for k in keys
            if k in outcomes.failures
        ]
        if problems:
            grouped[position] = error_for_images(problems)
            continue
        missing = [k for k in keys if k not in outcomes.results]
        if missing:
            raise RuntimeError(f"no result for images {missing}: the loader lost images")
        grouped[position] = [outcomes.results[k] for k in keys]
    return grouped
