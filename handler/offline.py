"""The offline job's own parts, shared by its local run (``scripts/classify.py``) and its run on
a Ray cluster (``handler.doors.ray_data``): which files are images, one row format, one chunking
rule, and one writer for JSON lines and Parquet.

    row            {"path", "label", "scores"} for a classified image, {"path", "error", "reason"}
                   for a file that is not one; every input file is exactly one row, in input order
    chunk          ``images_per_call(config)`` images per classifier call: a few forward batches,
                   so the loader workers stay busy and memory stays bounded however many files
    RowWriter      rows to ``.jsonl`` (one JSON object per line) or ``.parquet`` (``scores`` as
                   a JSON string: any label set fits one column), by the file's suffix
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from handler.config import HandlerConfig
from handler.errors import ImageError
from handler.model.topk import Prediction

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
# Forward batches per classifier call.
BATCHES_PER_CALL = 4
COLUMNS = ("path", "label", "scores", "error", "reason")
OUTPUT_SUFFIXES = (".jsonl", ".parquet")

Row = dict[str, Any]


def expand(paths: Sequence[str]) -> list[Path]:
    """Files, folders (searched recursively for image files) and globs, in a stable order;
    FileNotFoundError naming what matched nothing."""
    found: list[Path] = []
    for item in paths:
        matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))] or [Path(item)]
        for path in matches:
            if path.is_dir():
                found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            elif path.is_file():
                found.append(path)
            else:
                raise FileNotFoundError(f"no such file or folder: {item}")
    return found


def images_per_call(config: HandlerConfig) -> int:
    """The chunking rule: images handed to the classifier per call."""
    return config.batch_size * BATCHES_PER_CALL


def result_row(path: str, scores: Prediction) -> Row:
    """The row of a classified image: its top-1 label and top-k scores."""
    return {"path": path, "label": next(iter(scores)), "scores": scores}


def error_row(path: str, code: str, reason: str) -> Row:
    """The row of a file that could not be classified, with why."""
    return {"path": path, "error": code, "reason": reason}


def row(path: str, result: Prediction | ImageError) -> Row:
    """The row of one file and its classifier result."""
    if isinstance(result, ImageError):
        return error_row(path, result.code, result.reason)
    return result_row(path, result)


def as_columns(rows: Sequence[Row]) -> dict[str, list[Any]]:
    """Rows as columns (nulls where a row has no value; ``scores`` as a JSON string): the form
    Arrow, Parquet and Ray Data blocks take."""
    columns: dict[str, list[Any]] = {name: [r.get(name) for r in rows] for name in COLUMNS}
    columns["scores"] = [json.dumps(s) if s is not None else None for s in columns["scores"]]
    return columns


def from_columns(columns: dict[str, Any]) -> list[Row]:
    """Rows back from ``as_columns``'s form."""
    out = []
    for i, path in enumerate(columns["path"]):
        error = columns["error"][i]
        if error is not None:
            out.append(error_row(str(path), str(error), str(columns["reason"][i])))
        else:
            out.append(result_row(str(path), json.loads(columns["scores"][i])))
    return out


class RowWriter:
    """Writes rows, as they come, to ``out``: JSON lines, or Parquet (one row group per
    ``write``) for a ``.parquet`` file."""

    def __init__(self, out: Path) -> None:
        if out.suffix not in OUTPUT_SUFFIXES:
            raise ValueError(f"{out}: the output must end in {' or '.join(OUTPUT_SUFFIXES)}")
        self.out = out
        self.rows = 0
        self.failed = 0
        self._text = out.open("w") if out.suffix == ".jsonl" else None
        self._parquet: Any = None

    def write(self, rows: Iterable[Row]) -> None:
        rows = list(rows)
        self.rows += len(rows)
        self.failed += sum("error" in r for r in rows)
        if self._text is not None:
            self._text.writelines(json.dumps(r) + "\n" for r in rows)
            return
        if not rows:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(name, pa.string()) for name in COLUMNS])
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self.out, schema)
        self._parquet.write_table(pa.table(as_columns(rows), schema=schema))

    def close(self) -> None:
        if self._text is not None:
            self._text.close()
        elif self._parquet is not None:
            self._parquet.close()
        else:  # no rows at all: still a valid, empty file
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({name: pa.array([], pa.string()) for name in COLUMNS}), self.out)

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_rows(path: Path) -> list[Row]:
    """The rows a RowWriter wrote (JSON lines or Parquet)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return from_columns(pq.read_table(path).to_pydict())
    return [json.loads(line) for line in path.read_text().splitlines()]
