"""What the command-line front doors (classify.py, client.py) share beyond the offline job's own
parts (``handler.offline``: files, rows, writers): a progress bar, and the summary they end with."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from handler.offline import Row, RowWriter, expand


def expand_or_exit(paths: Sequence[str], program: str) -> list[Path]:
    """``handler.offline.expand``, a missing path ending the command with a message."""
    try:
        return expand(paths)
    except FileNotFoundError as exc:
        raise SystemExit(f"{program}: {exc}") from None


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


def write_rows(writer: RowWriter, rows: list[Row], progress: Progress) -> None:
    """Write ``rows``, advance the progress bar."""
    writer.write(rows)
    progress.add(len(rows), sum("error" in r for r in rows))


def finish(writer: RowWriter, failures: list[dict[str, Any]]) -> None:
    """The summary on stderr, each failure named, and exit status 1 if any image failed."""
    sys.stderr.write(f"\n{writer.rows - writer.failed} classified, {writer.failed} failed; wrote {writer.out}\n")
    for line in failures:
        sys.stderr.write(f"  {line['path']}: {line['error']}: {line['reason']}\n")
    sys.exit(1 if writer.failed else 0)
