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
