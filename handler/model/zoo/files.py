"""A zoo model's files (a timm or transformers folder, or the archive built from one), and the
directory the zoo's own loaders read them from."""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

ZOO_ARCHS = ("timm", "transformers")
CONFIG = "config.json"
PROCESSOR = "preprocessor_config.json"
# What save_pretrained, timm's save_for_hf and huggingface-cli write, in the zoos' own order of
# preference.
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")


class ZooFolderError(ValueError):
    """A model folder that cannot be served as it is: the message names the file and what was
    expected of it."""


@dataclass(frozen=True)
class ZooFiles:
    """What a zoo model is read and loaded from.

    Attributes:
        kind: ``timm`` or ``transformers``.
        where: the folder or archive, for messages.
        files: ``config.json``, the weights (one of WEIGHT_NAMES) and, for transformers,
            ``preprocessor_config.json``: each a file, or its bytes out of an archive.
    """

    kind: str
    where: str
    files: Mapping[str, Path | bytes] = field(repr=False)

    @property
    def weights_name(self) -> str:
        """The weights file's name (one of WEIGHT_NAMES)."""
        names = [name for name in WEIGHT_NAMES if name in self.files]
        if not names:
            raise ZooFolderError(f"{self.where}: no weights ({' or '.join(WEIGHT_NAMES)})")
        return names[0]

    def config(self) -> dict[str, Any]:
        """config.json, parsed; a clear error if it is not a JSON object."""
        return read_json(self.files[CONFIG], f"{self.where}/{CONFIG}")

    @contextmanager
    def directory(self, *, weights: bool = True) -> Iterator[Path]:
        """A private directory holding these files under their own names (links to files, the
        bytes written out): what timm's and transformers' loaders read. Gone after the block."""
        with tempfile.TemporaryDirectory(prefix="zoo_model_") as tmp:
            root = Path(tmp)
            for name, source in self.files.items():
                if name in WEIGHT_NAMES and not weights:
                    continue
                if isinstance(source, bytes):
                    (root / name).write_bytes(source)
                else:
                    (root / name).symlink_to(source.resolve())
            yield root


def read_json(source: Path | bytes, name: str) -> dict[str, Any]:
    """A JSON object from a file or bytes; ZooFolderError naming ``name`` otherwise."""
    try:
        data = source if isinstance(source, bytes) else source.read_bytes()
        loaded = json.loads(data)
    except OSError as exc:
        raise ZooFolderError(f"{name} cannot be read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ZooFolderError(f"{name} is not valid JSON ({exc})") from None
    if not isinstance(loaded, dict):
        raise ZooFolderError(f"{name} must hold a JSON object, got {type(loaded).__name__}")
    return loaded


def zoo_kind(config: Mapping[str, Any]) -> str | None:
    """``timm`` for a timm config.json (``architecture``, the hub layout timm writes),
    ``transformers`` for a Hugging Face one (``architectures`` / ``model_type``), else None."""
    if isinstance(config.get("architecture"), str):
        return "timm"
    if isinstance(config.get("architectures"), list) or isinstance(config.get("model_type"), str):
        return "transformers"
    return None
