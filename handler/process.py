"""Process-wide settings for a process that serves an ImageClassifier.

These change the whole process (the C allocator, Pillow's global pixel limit, torch's thread
pool), so the classifier never applies them by itself: a server adapter, a batch job or a
notebook that wants them calls ``configure_process`` once, before the classifier is created
(its loader workers fork then and inherit the allocator setting).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from PIL import Image

from handler.config import HandlerConfig
from handler.devices import thread_budget
from handler.memory import keep_freed_memory

log = logging.getLogger(__name__)


def configure_process(config: HandlerConfig, *, device: torch.device, backend_workers: Any = 1) -> int:
    """Apply ``config``'s process-wide settings; returns the torch thread count it set.

    - ``keep_freed_memory``: glibc keeps freed memory for the next batch (see handler.memory).
    - Pillow's decompression-bomb guard stays on, at ``max_image_pixels`` (TorchServe's stock
      handler turns it off).
    - torch intra-op threads: ``intra_op_threads``, or the cores shared among
      ``backend_workers`` processes serving on this machine (2 with the model on a GPU).
    """
    if config.keep_freed_memory:
        keep_freed_memory()
    Image.MAX_IMAGE_PIXELS = config.max_image_pixels
    threads = thread_budget(config.intra_op_threads, backend_workers, device)
    torch.set_num_threads(threads)
    return threads
