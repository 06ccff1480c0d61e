"""The one place that touches torch's private DataLoader internals.

A persistent DataLoader keeps its worker processes in ``loader._iterator._workers`` and stops
them with ``_iterator._shutdown_workers()``; neither is public API. Watching for dead workers and
restarting them needs both, so they are used here and nowhere else.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

from torch.utils.data import DataLoader


class WorkerSupervisor:
    """Owns a DataLoader built by ``build``: its worker processes' liveness, restart and stop."""

    def __init__(self, build: Callable[[], DataLoader]) -> None:
        self._build = build
        self.loader = build()

    def worker_pids(self) -> list[int]:
        """The worker processes' pids (empty before the first epoch forks them)."""
        return [w.pid for w in self._workers()]

    def dead_workers(self) -> list[int]:
        return [w.pid for w in self._workers() if not w.is_alive()]

    def has_workers(self) -> bool:
        return bool(self._workers())

    def restart(self) -> None:
        """Stop the workers (dead or alive) and build a fresh loader; it forks on its next epoch."""
        self.stop()
        self.loader = self._build()

    def stop(self) -> None:
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None

    def _workers(self) -> list:
        iterator = getattr(self.loader, "_iterator", None)
        return list(getattr(iterator, "_workers", None) or [])


def disarm_sigchld_handler() -> None:
    """Undo the SIGCHLD handler DataLoader installs once per process.

    That handler raises RuntimeError in the main thread wherever it happens to be when a worker
    dies -- in a TorchServe worker that is usually the socket read between requests, which would
    kill the whole backend worker. Dead loader workers are detected before each request instead.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    from torch.utils.data._utils import signal_handling

    if signal_handling._SIGCHLD_handler_set and signal.getsignal(signal.SIGCHLD) not in (
        signal.SIG_DFL,
        None,
    ):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
