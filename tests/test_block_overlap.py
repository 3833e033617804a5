"""Overlapped block transfers (app/block_overlap.py) through mmgp's real streaming code on the CPU.

mmgp runs with the same CUDA stand-ins as tests/test_offload.py. The overlap's CUDA calls go
through a `CudaStreams` object; `Recorder` stands in for it and logs every stream operation
(copies, events, waits, `record_stream`), so the tests check the ordering rules that make the
overlap safe on a GPU: a block copied ahead is waited for on the compute stream before it runs,
every tensor copied ahead is marked as used by the compute stream, and the CPU never runs more
than one block ahead. Images must come out bit for bit as without the overlap.
"""

from __future__ import annotations

import contextlib
import itertools
import re

import numpy as np
import pytest
import torch

from app import offload as ofl
from app.block_overlap import CudaStreams, _storage_tensors, overlap_block_transfers
from models.z_image import quantize as q
from tests.test_lora_offload import (  # noqa: F401 - fixtures
    assert_lora_round_trip,
    fresh_dynamo,
    lora_file,
    lora_reference,
)
from tests.test_offload import control_case, cpu_cuda_standins, load, render  # noqa: F401 - control_case: a fixture

SMALL = {"transformer": 0.001, "text_encoder": 0.001}  # every block streams


@pytest.fixture(scope="module")
def reference(tiny_dir) -> np.ndarray:
    return render(load(tiny_dir)[0], under_cuda_default=False)


class Event:
    ids = itertools.count()

    def __init__(self, log):
        self.log, self.id, self.stream = log, next(Event.ids), None

    def record(self, stream):
        self.stream = stream
        self.log.append(("record", self.id, stream))

    def synchronize(self):
        self.log.append(("sync", self.id))


class Stream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_event(self, event):
        self.log.append(("wait", event.id, self.name))

    def __repr__(self):
        return self.name


class Recorder(CudaStreams):
    """Logs stream operations; copies are real clones so each block gets fresh tensors."""

    def __init__(self):
        self.log: list[tuple] = []
        self.compute = Stream("compute", self.log)
        self.current = self.compute
        self.copied: dict[int, str] = {}  # id of each copied storage tensor -> stream it was copied on
        self.alive: list[torch.Tensor] = []  # keeps the ids above unique
        self.pinned: set[int] = set()  # nothing is pinned on the CPU stand-in: every copy is staged

    def current_stream(self):
        return self.current

    @contextlib.contextmanager
    def use_stream(self, stream):
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    def event(self):
        return Event(self.log)

    def is_pinned(self, tensor):
        return id(tensor) in self.pinned

    def pin(self, tensor):
        out = tensor.clone()
        self.pinned.add(id(out))
        self.alive.append(out)
        self.log.append(("pin", str(self.current)))
        return out

    def move(self, tensor):
        assert all(self.is_pinned(t) for t in _storage_tensors(tensor))  # staged first
        out = tensor.to("cpu", copy=True)
        for t in _storage_tensors(out):
            self.copied[id(t)] = str(self.current)
            self.alive.append(t)
        self.log.append(("copy", str(self.current)))
        return out

    def on_device(self, tensor):
        return False

    def record_stream(self, tensor, stream):
        self.log.append(("record_stream", id(tensor), str(stream)))


def recorded_overlap(manager) -> tuple:
    """The overlap installed on mmgp's manager with a Recorder for its streams: (its state, the recorder);
    each block's copy is logged first as ("copying", block, ahead?)."""
    manager.transfer_stream = Stream("transfer", [])
    rec = Recorder()
    manager.transfer_stream.log = rec.log
    state = overlap_block_transfers(manager, rec)
    real_copy = state._copy

    def logged_copy(entry, compute_stream, ahead):
        rec.log.append(("copying", entry, ahead))
        return real_copy(entry, compute_stream, ahead)

    state._copy = logged_copy
    return state, rec


@pytest.fixture
def overlapped(tiny_dir):
    """A profile-4 pipeline streaming every block, with the overlap installed on its manager."""
    with cpu_cuda_standins() as transfers:
        pipe, parts = load(tiny_dir)
        session = ofl.apply_profile(parts, 4, device="cuda", budgets=SMALL)
        manager = session.manager
        state, rec = recorded_overlap(manager)
        # ("run", block): a layer inside a streamed block starts, so after mmgp's check on the block
        # itself has loaded it (logged once per block call)
        inner = {}
        for model in ("transformer", "text_encoder"):
            for name, module in parts[model].named_modules():
                if re.search(r"(^|\.)(layers|noise_refiner|context_refiner)\.\d+$", name):
                    inner.update({m: f"{model}/{name}" for m in module.modules() if m is not module})

        def log_run(m, *_):
            if not rec.log or rec.log[-1] != ("run", inner[m]):
                rec.log.append(("run", inner[m]))

        for m in inner:
            m.register_forward_pre_hook(log_run)
        # ("ran", block) once any streamed block (embedders and final layer included) has run
        for entry in manager.blocks_of_modules:
            if "/" in entry:
                model, name = entry.split("/", 1)
                parts[model].get_submodule(name).register_forward_hook(
                    lambda m, *_, e=entry: rec.log.append(("ran", e)))
        yield pipe, parts, manager, state, rec, transfers
        ofl.release(session)


def test_overlapped_streaming_renders_like_unprofiled(overlapped, reference):
    pipe, parts, manager, state, rec, transfers = overlapped
    assert np.array_equal(render(pipe), reference)
    # from the second step on, every streamed transformer block (the towers' blocks, and with these
    # tiny budgets the embedders and the final layer too) was copied ahead: the first block of each
    # tower follows the last block of the previous one, the next step's first the last layer
    log = rec.log
    starts = [i for i, e in enumerate(log) if e == ("run", "transformer/noise_refiner.0")]
    assert len(starts) == 3  # one forward per step (prompt and negative prompt batched)
    second_step = log[starts[1]:starts[2]]
    assert ("copy", "compute") not in second_step
    assert sum(e[0] == "wait" for e in second_step) >= 4  # the four tower blocks at least
    assert state.successor["transformer/layers.1"] != "transformer/layers.0"  # not a tower's own chain
    # mmgp's own path (the stand-in) still loaded the models' non-block parts
    assert {m for m, b, _ in transfers if b is None} >= {"transformer", "text_encoder"}


def test_blocks_copied_ahead_are_waited_for_and_marked(overlapped):
    pipe, parts, manager, state, rec, _ = overlapped
    render(pipe, num_inference_steps=2)
    log = rec.log
    # every copy on the transfer stream records its storages as used by the compute stream
    ahead = [i for i, e in enumerate(log) if e == ("copy", "transfer")]
    assert ahead
    marked = {e[1] for e in log if e[0] == "record_stream" and e[2] == "compute"}
    transfer_storages = {i for i, s in rec.copied.items() if s == "transfer"}
    assert transfer_storages and transfer_storages <= marked
    assert not {i for i, s in rec.copied.items() if s == "compute"} & marked
    # a block's transfer-stream event is waited for on the compute stream before the block runs
    events_by_id = {e[1]: e[2] for e in log if e[0] == "record"}
    waits = [(i, e[1]) for i, e in enumerate(log) if e[0] == "wait"]
    assert waits and all(events_by_id[ev] is manager.transfer_stream and e_stream == "compute"
                         for (_, ev), e_stream in zip(waits, [log[i][2] for i, _ in waits]))
    # each transfer-stream event follows the copies of one block; the block that runs right after a
    # wait is the one whose copies that event follows, and nothing is copied in order in between
    copying, event_block = None, {}
    for e in log:
        if e[0] == "copying":
            copying = e[1]
        elif e[0] == "record" and e[2] is manager.transfer_stream:
            event_block[e[1]] = copying
    ran = [i for i, e in enumerate(log) if e[0] == "ran"]
    for i, ev in waits:
        following = [r for r in ran if r > i]
        assert following and log[following[0]][1] == event_block[ev]
        assert ("copy", "compute") not in log[i:following[0]]
    # the second main layer of every step was copied ahead: no compute-stream copy right before it
    for r in (i for i, e in enumerate(log) if e == ("run", "transformer/layers.1")):
        since = max(i for i in range(r) if log[i][0] == "run")
        assert ("copy", "compute") not in log[since:r] and any(e[0] == "wait" for e in log[since:r])


def test_cpu_lead_is_bounded(overlapped):
    """Markers recorded on the compute stream at each block start (the end of the previous block):
    before anything is copied for block i, the marker of block i-1 (the end of block i-2) was
    waited on, so the GPU is at most one block behind."""
    pipe, parts, manager, state, rec, _ = overlapped
    render(pipe, num_inference_steps=2)
    log = rec.log
    markers = [e[1] for e in log if e[0] == "record" and e[2] is rec.compute]
    synced = [e[1] for e in log if e[0] == "sync"]
    assert synced == markers[:len(synced)] and len(markers) - len(synced) == 1  # lead_blocks=1
    recorded = done = 0
    for e in log:
        if e[0] == "record" and e[2] is rec.compute:
            recorded += 1
        elif e[0] == "sync":
            done += 1
        elif e[0] == "copy":  # any copy takes memory: only the current block's marker is pending
            assert recorded - done <= 1


def test_unload_all_drops_the_block_copied_ahead(overlapped, reference):
    pipe, parts, manager, state, rec, _ = overlapped
    render(pipe)
    manager.unload_all()
    assert state.ahead is None and manager.loaded_blocks["transformer"] is None
    rec.log.clear()
    assert np.array_equal(render(pipe), reference)
    # the first block after the unload is copied in order on the compute stream, not waited for
    first_copy = next(e for e in rec.log if e[0] in ("copy", "wait"))
    assert first_copy == ("copy", "compute")


def test_preloaded_blocks_and_int8_with_overlap(tiny_dir):
    """int8 (quanto) weights: both storages of every weight are marked; a budget that keeps some
    blocks resident skips them in the chain; images match the same profile without the overlap."""
    images = []
    for overlap in (False, True):
        with cpu_cuda_standins():
            pipe, parts = load(tiny_dir)
            q.quantize_on_the_fly(parts["transformer"])
            size = sum(p.numel() for p in parts["transformer"].layers[0].parameters()) / 2**20
            session = ofl.apply_profile(parts, 4, device="cuda",
                                        budgets={"transformer": 4 * size, "text_encoder": 0.001})
            manager = session.manager
            if overlap:
                rec = Recorder()
                manager.transfer_stream = Stream("transfer", rec.log)
                state = overlap_block_transfers(manager, rec)
            images.append(render(pipe))
            if overlap:
                assert state.copies > 0
                weights = [p for p in parts["transformer"].parameters() if hasattr(p, "_scale")]
                assert weights  # quantized
                marked = sum(1 for e in rec.log if e[0] == "record_stream")
                assert marked == sum(1 for s in rec.copied.values() if s == "transfer")
            ofl.release(session)
    assert np.array_equal(images[0], images[1])


def test_storage_tensors_of_quantized_weights():
    lin = torch.nn.Linear(16, 8).to(torch.bfloat16)
    model = torch.nn.Sequential(lin)
    q.quantize_on_the_fly(model, exclude=())
    w = model[0].weight
    inner = _storage_tensors(w)
    assert len(inner) == 2 and {t.dtype for t in inner} == {torch.int8, torch.bfloat16}
    plain = torch.zeros(3)
    assert _storage_tensors(plain) == [plain]
    # weights in ordinary RAM are staged in (stand-in) pinned memory, quantized ones as quanto tensors
    rec = Recorder()
    moved = rec.to_device(w)
    assert type(moved) is type(w) and torch.equal(moved.dequantize(), w.dequantize())
    assert [e[0] for e in rec.log] == ["pin", "pin", "copy"]
    staged = rec.pin(plain)
    rec.log.clear()
    assert torch.equal(rec.to_device(staged), plain) and [e[0] for e in rec.log] == ["copy"]  # pinned: as is


def test_profile_option_installs_the_overlap(tiny_dir):
    with cpu_cuda_standins():
        pipe, parts = load(tiny_dir)
        session = ofl.apply_profile(parts, 4, device="cuda", overlap_transfers=True)
        assert session.overlap is not None  # in our session, not on mmgp's manager
        assert not hasattr(session.manager, "_wgp_overlap")
        ofl.release(session)
        assert session.overlap is None
        pipe, parts = load(tiny_dir)
        session = ofl.apply_profile(parts, 1, device="cuda", overlap_transfers=True)
        assert session.overlap is None  # nothing streams in profile 1
        ofl.release(session)
        session = ofl.apply_profile(load(tiny_dir)[1], 4, device="cuda")
        assert session.overlap is None  # explicit here; the service's config turns it on by default
        ofl.release(session)


def test_flag_reaches_the_profile(tiny_dir, tmp_path, monkeypatch):
    import wgp_zimage
    from app.service import GenerationService, ServiceConfig

    assert ServiceConfig.from_args(wgp_zimage.parse_args(["generate", "--prompt", "x"])).overlap_transfers is True
    cfg = ServiceConfig.from_args(wgp_zimage.parse_args(["generate", "--prompt", "x", "--no-overlap-transfers"]))
    assert cfg.overlap_transfers is False
    assert ServiceConfig().overlap_transfers is True
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "z_image_tiny").symlink_to(tiny_dir, target_is_directory=True)
    seen = []
    real = ofl.apply_profile
    monkeypatch.setattr(ofl, "apply_profile", lambda *a, **k: (seen.append(k), real(*a, **k))[1])
    for overlap in (True, False):
        service = GenerationService(ServiceConfig(checkpoints_dir=tmp_path / "ckpts", output_dir=tmp_path / "out",
                                                  overlap_transfers=overlap))
        service.pipeline("z_image_tiny")
        assert seen[-1]["overlap_transfers"] is overlap  # (it keys the pipeline on CUDA only: test_memory_override)


def _on_device(manager, entry: str) -> bool:
    """Whether a block's parameters are the copies made for it (not mmgp's stored RAM tensors)."""
    return any(_storage_tensors(getattr(parent, name))[0].data_ptr() != _storage_tensors(p)[0].data_ptr()
               for parent, name, p, _, _ in manager.blocks_of_modules[entry])


def test_an_unexpected_block_drops_the_one_copied_ahead(overlapped):
    pipe, parts, manager, state, rec, _ = overlapped
    render(pipe, num_inference_steps=2)
    manager.unload_all()
    assert not any(_on_device(manager, e) for e in manager.blocks_of_modules if e.startswith("transformer/"))
    state.load_blocks("transformer", "layers.0")
    assert state.ahead[:2] == ("transformer", "layers.1") and _on_device(manager, "transformer/layers.1")
    state.load_blocks("transformer", "noise_refiner.0")  # not the block copied ahead
    assert not _on_device(manager, "transformer/layers.1") and not _on_device(manager, "transformer/layers.0")
    assert _on_device(manager, "transformer/noise_refiner.0")
    # a model kept through unload_all keeps its block copied ahead; the others' go
    state.load_blocks("transformer", "layers.0")
    manager.unload_all(keep=["transformer"])
    assert state.ahead is not None and _on_device(manager, "transformer/layers.1")
    manager.unload_all()
    assert state.ahead is None and not _on_device(manager, "transformer/layers.1")


@pytest.mark.parametrize("fail_at", ["ahead", "in_order"])
def test_out_of_memory_half_way_leaves_nothing_on_the_device(overlapped, reference, fail_at):
    """A copy that fails part way (out of memory) raises; unload_all (what the app's OOM handling
    calls) then leaves no block on the device, and the next render is right."""
    pipe, parts, manager, state, rec, _ = overlapped
    render(pipe, num_inference_steps=2)
    manager.unload_all()
    real_move = rec.move
    calls = []

    def failing(tensor):
        calls.append(rec.current)
        if len(calls) == 3 and (str(rec.current) == "transfer") == (fail_at == "ahead"):
            raise torch.OutOfMemoryError("stand-in: CUDA out of memory")
        if len(calls) == 3:
            calls.clear()  # not the stream asked for: fail on a later block
        return real_move(tensor)

    rec.move = failing
    with pytest.raises(torch.OutOfMemoryError):
        render(pipe)
    rec.move = real_move
    manager.unload_all()
    assert not any(_on_device(manager, e) for e in manager.blocks_of_modules if "/" in e)
    assert np.array_equal(render(pipe), reference)


def test_compile_lora_and_overlap(tiny_dir, lora_file, lora_reference, fresh_dynamo):  # noqa: F811
    """The service's order with every block streaming: compile at load, profile, overlap, LoRA.
    Compiled blocks read the weights the overlap swaps in; images equal the unprofiled ones."""
    from models.z_image.transformer import compile_blocks

    with cpu_cuda_standins():
        pipe, parts = load(tiny_dir)
        compile_blocks(pipe.transformer, backend="aot_eager")
        session = ofl.apply_profile(parts, 4, device="cuda", budgets=SMALL)
        manager = session.manager
        rec = Recorder()
        manager.transfer_stream = Stream("transfer", rec.log)
        state = overlap_block_transfers(manager, rec)
        try:
            assert_lora_round_trip(pipe, lora_file, lora_reference)
            assert state.copies > 0 and any(e[0] == "wait" for e in rec.log)
        finally:
            ofl.release(session)



def test_overlapped_streaming_with_a_controlnet(control_case):  # noqa: F811
    """The ControlNet's blocks stream with the transformer's under the overlap too: the image is the unprofiled
    one, and from the second step on each control block was copied ahead (its successor learnt from the first
    step), not copied on the compute stream when it is called."""
    from tests.test_offload import control_render, load_control

    model_dir, picture, controlled = control_case
    with cpu_cuda_standins():
        pipe, parts = load_control(model_dir)
        session = ofl.apply_profile(parts, 4, device="cuda", budgets=SMALL)
        _, rec = recorded_overlap(session.manager)
        try:
            assert np.array_equal(control_render(pipe, picture), controlled)
        finally:
            ofl.release(session)
    copies = [e for e in rec.log if e[0] == "copying" and "controlnet." in e[1]]
    control_blocks = {e[1] for e in copies}
    assert {"transformer/controlnet.control_layers.0", "transformer/controlnet.control_layers.1"} <= control_blocks
    per_block = {b: [ahead for _, e, ahead in copies if e == b] for b in control_blocks}
    assert all(any(flags[1:]) for flags in per_block.values())  # copied ahead once its place was learnt
