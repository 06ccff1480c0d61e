"""Copies of an archive with other handler settings (as if its model-config.yaml said so)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Mapping

import yaml


def with_settings(mar: Path, settings: Mapping[str, Any], folder: Path,
                  frontend: Mapping[str, Any] | None = None) -> Path:
    """A copy of ``mar`` in ``folder`` (same file name, so the same model name) whose
    model-config.yaml ``handler:`` section has ``settings`` on top of its own (and its
    TorchServe keys, ``batchSize``, ``maxBatchDelay``, ..., ``frontend``)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / mar.name
    with zipfile.ZipFile(mar) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as copy:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "model-config.yaml":
                config = yaml.safe_load(data) or {}
                config.update(frontend or {})
                config["handler"] = {**(config.get("handler") or {}), **settings}
                data = yaml.safe_dump(config, sort_keys=False).encode()
            copy.writestr(item, data)
    return out
