"""What arithmetic a model's vectors are made with (``--precision``), as data: each precision
names its CPU backend and what it was measured to cost and gain (BENCHMARKS.md, "CPU precision").

- ``fp32``: open_clip in torch (fp16 autocast on CUDA, as before).
- ``int8``: both towers exported to ONNX and dynamically quantised (:mod:`encoder.exported`),
  every MatMul and Gemm with a weight in int8, attention projections included; CPU only.
- ``bf16``: open_clip's own ``pure_bf16`` (every weight in bfloat16) in torch; CPU only here.

Both are within cosine 0.99 of fp32 on every vector of the demo library (median >= 0.995), P@5
and zero-shot accuracy within 0.01 (tests/test_precision.py): a store may hold any of them, and
records each.
"""

from __future__ import annotations

from dataclasses import dataclass

from store.errors import InputError


@dataclass(frozen=True)
class Precision:
    name: str
    exported: bool  # the towers run from an ONNX export (CPU) instead of the torch model
    open_clip: str  # what open_clip.create_model_and_transforms is asked for (the torch model's weights)
    summary: str


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", False, "fp32", "open_clip in torch, full precision (the reference)"),
    "int8": Precision("int8", True, "fp32", "ONNX Runtime int8 (dynamic quantisation of every matrix product "
                                            "with a weight, CPU): the fastest, within cosine 0.99 of fp32"),
    "bf16": Precision("bf16", False, "pure_bf16", "open_clip in torch with bfloat16 weights (CPU with AVX512-BF16 "
                                                  "or AMX): faster than fp32 on large models, closest to it"),
}
DEFAULT_PRECISION = "fp32"


def check_precision(name: str, device: str) -> Precision:
    """The precision *name* on *device* (resolved: cpu or cuda...), or one line saying why not."""
    if name not in PRECISIONS:
        raise InputError(f"unknown precision '{name}': use one of {', '.join(PRECISIONS)}")
    precision = PRECISIONS[name]
    if precision.name != "fp32" and device != "cpu":
        raise InputError(f"--precision {name} is for the CPU; on {device} clipdex already embeds in fp16: "
                         "use --precision fp32, or --device cpu")
    return precision
