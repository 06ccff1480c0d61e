"""What the command-line front doors share: finding image files, a progress bar, the JSON lines
they write (one per image), and the summary they end with."""

from __future__ import annotations

import glob
import json
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

from handler.doors.ray_data import error_row, result_row

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def expand(paths: list[str], program: str) -> list[Path]:
    """Files, folders (searched recursively for image files) and globs, in a stable order."""
    found: list[Path] = []
    for item in paths:
        matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))] or [Path(item)]
        for path in matches:
            if path.is_dir():
                found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            elif path.is_file():
                found.append(path)
            else:
                raise SystemExit(f"{program}: no such file or folder: {item}")
    return found


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int):
        self.total, self.done, self.failed = total, 0, 0
        self._lock = threading.Lock()

    def add(self, done: int, failed: int) -> None:
        with self._lock:
            self.done += done
            self.failed += failed
            filled = int(30 * self.done / max(self.total, 1))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} images, "
                             f"{self.failed} failed")
            sys.stderr.flush()


def result_line(path: Path, scores: dict[str, float]) -> dict[str, Any]:
    return result_row(str(path), scores)


def error_line(path: Path, error: str, reason: str) -> dict[str, Any]:
    return error_row(str(path), error, reason)


def write_lines(out: TextIO, lines: list[dict[str, Any]], progress: Progress) -> int:
    """Write ``lines`` as JSON lines, advance the progress bar; how many of them failed."""
    bad = sum("error" in line for line in lines)
    progress.add(len(lines), bad)
    for line in lines:
        out.write(json.dumps(line) + "\n")
    return bad


def finish(total: int, failed: int, out: Path, failures: list[dict[str, Any]] | None = None) -> None:
    """The summary on stderr (each failure named: ``failures``, or those in the JSONL ``out``), and
    exit status 1 if any image failed."""
    sys.stderr.write(f"\n{total - failed} classified, {failed} failed; wrote {out}\n")
    if failures is None:
        failures = [line for line in (json.loads(x) for x in out.read_text().splitlines()) if "error" in line]
    for line in failures:
        sys.stderr.write(f"  {line['path']}: {line['error']}: {line['reason']}\n")
    sys.exit(1 if failed else 0)
