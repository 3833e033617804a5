"""LoRAs under every MMGP memory profile give the same image as without offload (mmgp's real code)."""

import numpy as np
import pytest

from app import offload as ofl
from models.lora_runtime import LoraManager
from models.z_image.lora import convert_state_dict
from tests.test_lora_formats import load_tiny_transformer, write_lora
from tests.test_offload import fake_cuda, load, quick_gc, render  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def lora_file(tiny_dir, tmp_path_factory):
    path, _ = write_lora(tmp_path_factory.mktemp("loras"), "kohya_musubi",
                         load_tiny_transformer(tiny_dir), name="style")
    return path


def with_lora(pipe, lora_file, strength):
    manager = LoraManager(pipe.transformer, convert_state_dict)
    reports = manager.sync({lora_file: strength})
    assert reports[0].applied == reports[0].total > 0
    return manager


def assert_lora_round_trip(pipe, lora_file, lora_reference) -> None:
    """Without the LoRA, with it (a per-step schedule), removed again: each image as without offload."""
    assert np.array_equal(render(pipe), lora_reference[1])
    loras = with_lora(pipe, lora_file, "1.0,0.3")
    assert np.array_equal(render(pipe, step_start=loras.step_start), lora_reference[0])
    loras.remove_all()
    assert np.array_equal(render(pipe), lora_reference[1])


@pytest.fixture(scope="module")
def lora_reference(tiny_dir, lora_file):
    pipe, _ = load(tiny_dir)
    manager = with_lora(pipe, lora_file, "1.0,0.3")
    image = render(pipe, under_cuda_default=False, step_start=manager.step_start)
    manager.remove_all()
    base = render(pipe, under_cuda_default=False)
    assert not np.array_equal(image, base)
    return image, base


@pytest.mark.parametrize("profile_no", [1, 2, 3, 4, 5])
def test_lora_under_profile(tiny_dir, lora_file, lora_reference, fake_cuda, profile_no):  # noqa: F811
    pipe, parts = load(tiny_dir)
    manager = ofl.apply_profile(parts, profile_no, device="cuda")
    loras = with_lora(pipe, lora_file, "1.0,0.3")
    try:
        image = render(pipe, step_start=loras.step_start)
        assert np.array_equal(image, lora_reference[0])
        loras.remove_all()
        assert np.array_equal(render(pipe), lora_reference[1])  # removal restores the base output
    finally:
        ofl.release(manager)


@pytest.fixture()
def fresh_dynamo():
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_lora_under_compile(tiny_dir, lora_file, lora_reference, fresh_dynamo):
    """--compile with LoRAs: blocks compiled before the LoRA is attached still apply it (dynamo
    guards on the hooks), a per-step schedule adds no graphs, and removal restores the base image."""
    from torch._dynamo.utils import counters

    from models.z_image.transformer import compile_blocks

    pipe, _ = load(tiny_dir)
    compile_blocks(pipe.transformer, backend="aot_eager")
    base = render(pipe, under_cuda_default=False)  # compiled without LoRA first
    assert np.array_equal(base, lora_reference[1])
    loras = with_lora(pipe, lora_file, "1.0,0.3")
    image = render(pipe, under_cuda_default=False, step_start=loras.step_start)
    assert np.array_equal(image, lora_reference[0])
    graphs = counters["stats"]["unique_graphs"]
    loras.sync({lora_file: "0.6,0.9,0.2"})  # other strengths: the same compiled code
    render(pipe, under_cuda_default=False, step_start=loras.step_start)
    assert counters["stats"]["unique_graphs"] == graphs
    loras.remove_all()
    assert np.array_equal(render(pipe, under_cuda_default=False), lora_reference[1])


@pytest.mark.parametrize("profile_no", [1, 4])
def test_lora_under_compile_and_profile(tiny_dir, lora_file, lora_reference, fake_cuda, fresh_dynamo,  # noqa: F811
                                        profile_no):
    """The service's order: compile at load, then the memory profile, then the LoRA. mmgp's loading
    checks stay outside the full-graph compiled blocks (a graph break would raise)."""
    from models.z_image.transformer import compile_blocks

    pipe, parts = load(tiny_dir)
    compile_blocks(pipe.transformer, backend="aot_eager")
    manager = ofl.apply_profile(parts, profile_no, device="cuda")
    try:
        assert_lora_round_trip(pipe, lora_file, lora_reference)
    finally:
        ofl.release(manager)
