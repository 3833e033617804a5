"""Overlapped block transfers for the models mmgp streams (the default; `--no-overlap-transfers` turns it off).

In the low-VRAM profiles mmgp 3.8.2 streams a model block by block: when block i starts it calls
`torch.cuda.synchronize()`, then issues block i+1's copy on its transfer stream, then block i's
kernels are launched. The device-wide sync drains the GPU at every block, so the GPU waits while
the CPU issues the prefetch (through quanto's Python tensor subclass for int8 weights) and
launches the next kernels: on an H200 a profile-4 step took 1.68x a resident one, with copies and
compute barely overlapping (bench/RESULTS.md).

`overlap_block_transfers(manager)` replaces that step, on one manager, with stream ordering:
- the compute stream waits (on the GPU, not the CPU) for an event recorded after block i+1's copies;
- every tensor copied on the transfer stream is marked as used by the compute stream
  (`record_stream`), so the caching allocator cannot give its memory to a later copy before the
  kernels that read it have run;
- the block copied ahead is the next one in its tower (mmgp's chain) or, for the last block of a
  tower, the block that followed it last time (the next tower, the next step's first block);
- the CPU runs at most one block ahead of the GPU: before it copies block i+1 it waits for the end
  of block i-2, which bounds the streamed blocks resident at once to three (i-1 running, i queued,
  i+1 copying; with mmgp's sync: two).
- weights kept in ordinary RAM (profile 5; the text encoder in profile 4) are copied into pinned
  memory first (torch's caching pool), so their transfer is asynchronous too.
Which blocks stream, budgets, preloading and unloading stay mmgp's. mmgp's own LoRA slots (not
used by the app) fall back to mmgp's path.
"""

from __future__ import annotations

import collections
import logging
import types
from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

log = logging.getLogger("wgp_zimage")


class CudaStreams:
    """The CUDA calls the overlap makes; the tests stand in for the primitives on a CPU-only torch."""

    def current_stream(self) -> Any:
        return torch.cuda.current_stream()

    def use_stream(self, stream: Any):
        return torch.cuda.stream(stream)

    def event(self) -> Any:
        return torch.cuda.Event()

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.is_pinned()

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory()  # torch's caching pinned-memory pool: reused once the copy is done

    def move(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to("cuda", non_blocking=True)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """An asynchronous copy. Weights in ordinary RAM (profile 5, the text encoder of profile 4)
        are first copied into pinned memory: a copy from pageable memory would hold the CPU for
        the whole transfer and leave the GPU without queued work."""
        if not all(self.is_pinned(t) for t in _storage_tensors(tensor)):
            tensor = _map_storages(tensor, self.pin)
        return self.move(tensor)

    def on_device(self, tensor: torch.Tensor) -> bool:
        return tensor.is_cuda

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        tensor.record_stream(stream)


def _storage_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding a tensor's memory (a quanto weight: its int8 data and its scale)."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return [t for n in names for t in _storage_tensors(getattr(tensor, n))]
    return [tensor]


def _map_storages(tensor: torch.Tensor, fn) -> torch.Tensor:
    """tensor rebuilt with fn applied to each plain tensor it holds."""
    if is_traceable_wrapper_subclass(tensor):
        names, ctx = tensor.__tensor_flatten__()
        inner = {n: _map_storages(getattr(tensor, n), fn) for n in names}
        return type(tensor).__tensor_unflatten__(inner, ctx, tensor.size(), tensor.stride())
    return fn(tensor)


class _Overlap:
    """Per-manager state: the block copied ahead, its event, and the CPU-lead markers."""

    def __init__(self, manager, streams: CudaStreams, lead_blocks: int):
        from models.mmgp_support import import_mmgp

        self.mmgp = import_mmgp()
        self.manager = manager
        self.streams = streams
        self.lead_blocks = lead_blocks
        self.original_load = manager.gpu_load_blocks
        self.original_unload_all = manager.unload_all
        self.ahead: tuple[str, str, Any] | None = None  # (model id, block copied ahead, its copies' event)
        self.markers: collections.deque = collections.deque()
        # the block that followed each block last time (within a model): mmgp only chains the blocks
        # of one tower, so the first block of each tower (3 per transformer step) would wait
        self.successor: dict[str, str] = {}
        self.previous: str | None = None
        self.copies = 0  # blocks copied on the transfer stream (for logs and tests)

    def drop_ahead(self) -> None:
        """Unload the block copied ahead (its memory returns once the GPU is past this point)."""
        if self.ahead is not None:
            model_id, blocks_name, _ = self.ahead
            self.ahead = None
            self.manager.gpu_unload_blocks(model_id, blocks_name)

    def _copy(self, entry: str, compute_stream: Any, ahead: bool) -> None:
        m = self.manager
        for parent, name, p, is_buffer, tied in m.blocks_of_modules[entry]:
            if tied is not None:
                tied_now = getattr(tied[0], tied[1])
                if self.streams.on_device(tied_now):
                    setattr(parent, name, tied_now)
                    continue
            q = self.streams.to_device(p)
            if ahead:
                for t in _storage_tensors(q):
                    self.streams.record_stream(t, compute_stream)
            q = self.mmgp._make_buffer(q) if is_buffer else self.mmgp._make_parameter(q, requires_grad=False)
            setattr(parent, name, q)
            if tied is not None:
                setattr(tied[0], tied[1], q)

    def load_blocks(self, model_id: str, blocks_name: str | None, preload: bool = False) -> None:
        m = self.manager
        model = m.models[model_id]
        if preload or blocks_name is None or not m.async_transfers or getattr(model, "_loras_active_adapters", None):
            return self.original_load(model_id, blocks_name, preload)
        entry = f"{model_id}/{blocks_name}"
        loaded = m.loaded_blocks[model_id]
        if loaded is not None:
            m.gpu_unload_blocks(model_id, loaded)
            if m.ready_to_check_mem():
                m.empty_cache_if_needed()
        compute = self.streams.current_stream()
        # bound the CPU's lead: block i-2 must have finished before more memory is taken (a marker
        # recorded now marks the end of block i-1's kernels)
        marker = self.streams.event()
        marker.record(compute)
        self.markers.append(marker)
        while len(self.markers) > self.lead_blocks:  # marker i-1 marks the end of block i-2
            self.markers.popleft().synchronize()
        # the block is registered before its copies start, so that an error half way (out of
        # memory) leaves it where unload_all finds it
        m.loaded_blocks[model_id] = blocks_name
        if self.ahead is not None and self.ahead[:2] == (model_id, blocks_name) and self.ahead[2] is not None:
            compute.wait_event(self.ahead[2])
            self.ahead = None
        else:
            self.drop_ahead()  # another block than expected, or a copy cut short
            self._copy(entry, compute, ahead=False)  # in order on the compute stream
        if self.previous is not None and self.previous.startswith(model_id + "/"):
            self.successor[self.previous] = entry
        self.previous = entry
        following = m.next_blocks_names.get(entry) or self.successor.get(entry)
        if following is not None:
            self.ahead = (model_id, following[len(model_id) + 1:], None)  # no event: not complete
            with self.streams.use_stream(m.transfer_stream):
                self._copy(following, compute, ahead=True)
                done = self.streams.event()
                done.record(m.transfer_stream)
            self.ahead = (*self.ahead[:2], done)
            self.copies += 1

    def unload_all(self, *args, **kwargs):
        keep = kwargs.get("keep", args[0] if args else ())
        if self.ahead is not None and self.ahead[0] not in keep:
            self.drop_ahead()  # mmgp unloads only the next block of a tower
        self.previous = None
        return self.original_unload_all(*args, **kwargs)


def overlap_block_transfers(manager, streams: CudaStreams | None = None, lead_blocks: int = 1) -> _Overlap:
    """Make `manager` (an mmgp Offload) stream blocks without a device sync per block; see the module doc."""
    state = _Overlap(manager, streams or CudaStreams(), lead_blocks)
    manager.gpu_load_blocks = types.MethodType(lambda _self, *a, **k: state.load_blocks(*a, **k), manager)
    manager.unload_all = types.MethodType(lambda _self, *a, **k: state.unload_all(*a, **k), manager)
    log.info("memory profile: block transfers overlap compute (no device sync per block)")
    return state
