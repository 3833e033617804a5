"""mmgp and optimum-quanto helpers that know nothing of a model family.

The app layer (app/offload.py) and the families' loaders import mmgp only through `import_mmgp`.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn


def import_mmgp():
    """`mmgp.offload`, imported with its loader patches undone; import mmgp only through this.

    Importing mmgp 3.8.2 replaces `safetensors.safe_open` and `safetensors.torch.load_file` (and
    the references accelerate and transformers hold) with its own reader, which lacks the
    `backend=` argument transformers 5 passes: after a plain `import mmgp.offload` every
    `from_pretrained` in the process fails. mmgp's own loaders call its reader directly, so
    restoring the originals changes nothing for them. Its other import-time effects stay: quanto
    module classes for nn.Linear (mmgp's router, numerically quanto's QLinear) and nn.Embedding,
    and the `_force_device` override of transformers' `.device`.
    """
    import safetensors
    import safetensors.torch
    from mmgp import offload, safetensors2

    originals = {"safe_open": safetensors2._old_safe_open, "load_file": safetensors2._old_torch_load_file}
    safetensors.safe_open = originals["safe_open"]
    safetensors.torch.load_file = originals["load_file"]
    for module_name in ("accelerate.utils.modeling", "transformers.modeling_utils"):
        module = sys.modules.get(module_name)
        if module is not None:
            if getattr(module, "safe_open", None) is safetensors2.safe_open:
                module.safe_open = originals["safe_open"]
            if getattr(module, "safe_load_file", None) is safetensors2.torch_load_file:
                module.safe_load_file = originals["load_file"]
    return offload


def is_quantized(model: nn.Module) -> bool:
    from optimum.quanto import QModuleMixin

    return any(isinstance(m, QModuleMixin) for m in model.modules())


# torch's CPU allocator aligns every storage to 64 bytes; tensors read from a safetensors file are
# views at whatever offset the file gives them
CPU_ALIGNMENT = 64


def align_int8_storage(model: nn.Module, alignment: int = CPU_ALIGNMENT) -> int:
    """Give every CPU int8 quanto weight whose data is not `alignment`-aligned its own storage.

    On CPUs with AMX, quanto's bf16 CPU matmul (`torch._weight_int8pack_mm`) segfaults when the
    int8 weight's data pointer is not 16-byte aligned, which an int8 tensor read from a
    safetensors file often is (measured on a Sapphire Rapids Xeon, torch 2.13). A copy made by
    torch's allocator is aligned. Returns the number of weights copied.
    """
    from optimum.quanto import QModuleMixin
    from optimum.quanto.tensor.weights.qbytes import WeightQBytesTensor

    copied = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if not (isinstance(module, QModuleMixin) and isinstance(w, WeightQBytesTensor)):
            continue
        data = w._data
        if data.device.type != "cpu" or (data.is_contiguous() and data.data_ptr() % alignment == 0):
            continue
        aligned = torch.empty_like(data, memory_format=torch.contiguous_format).copy_(data)
        inner = WeightQBytesTensor.create(w.qtype, w.axis, w.size(), w.stride(), aligned, w._scale,
                                          activation_qtype=w.activation_qtype)
        module.weight = nn.Parameter(inner, requires_grad=False)
        copied += 1
    return copied
