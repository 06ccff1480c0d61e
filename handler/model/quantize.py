"""int8 through PyTorch's PT2E flow with the x86 Inductor quantizer (torchao, where PyTorch
moved it): calibrated once, when the archive is built, and saved as a ``torch.export`` program
(``INT8_PROGRAM``) that start-up loads and compiles without recalibrating.

Static post-training quantization: int8 weights (per channel) and activations (per tensor),
with the scales observed on the calibration images. The int8 kernels are inductor's (and
oneDNN's): the program is meant to be compiled with freezing on; run eagerly it is a slow
reference of the same arithmetic.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

# The program's file name in a model directory or archive.
INT8_PROGRAM = "int8_program.pt2"
# The program takes any batch size up to this (the batch dimension is exported dynamic).
MAX_BATCH = 4096


def _batch_dim() -> dict[int, torch.export.Dim]:
    return {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}


def quantize_int8(model: nn.Module, calibration: Iterable[torch.Tensor]) -> torch.export.ExportedProgram:
    """``model`` (fp32, eval) quantized to int8 with scales observed on the ``calibration``
    batches (normalized model input, each of at least 2 images), as a program with a dynamic
    batch dimension. Raises what export or the quantizer raise for a model they cannot take."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    batches = [b.contiguous() for b in calibration]
    if not batches or any(len(b) < 2 for b in batches):
        raise ValueError("int8 calibration needs batches of at least 2 images")
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
    example = (batches[0],)
    graph = torch.export.export(model.eval(), example, dynamic_shapes=(_batch_dim(),)).module()
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    converted = convert_pt2e(prepared)
    return torch.export.export(converted, example, dynamic_shapes=(_batch_dim(),))


def save_program(program: torch.export.ExportedProgram, path: Path) -> None:
    """Write ``program`` where ``load_int8_program`` reads it."""
    torch.export.save(program, str(path))


def load_int8_program(source: Path | bytes) -> nn.Module:
    """The saved int8 program (a file, or its bytes from an archive) as a callable module."""
    import torchao.quantization.pt2e  # noqa: F401  (registers the quantize/dequantize ops it calls)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch.export's notes on loading programs
        program = torch.export.load(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    return program.module()
