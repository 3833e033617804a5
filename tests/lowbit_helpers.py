"""What the low-bit file tests share: a tiny render through the CLI, its fp32 reference image, PSNR."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import wgp_zimage
from tests.conftest import cli


def render_args(model_dir, out, *extra: str, model: str = "tiny") -> list[str]:
    """The 3-step 64x64 job of a fixed prompt and seed that every low-bit format is compared on."""
    return ["generate", "--model", model, "--model-dir", str(model_dir), "--steps", "3", "--width", "64", "--height",
            "64", "--seed", "5", "--prompt", "a red fox", "--output", str(out), *extra]


def render(capsys, model_dir, out, *extra: str, model: str = "tiny") -> np.ndarray:
    """That job's image through the CLI, as float64 pixels."""
    rc, _, err = cli(capsys, *render_args(model_dir, out, *extra, model=model))
    assert rc == 0, err
    return np.asarray(Image.open(out)).astype(np.float64)


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory) -> np.ndarray:
    """The job's image with the tiny model's own (fp32) safetensors weights."""
    out = tmp_path_factory.mktemp("ref") / "ref.png"
    assert wgp_zimage.main(render_args(tiny_dir, out)) == 0
    return np.asarray(Image.open(out)).astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
