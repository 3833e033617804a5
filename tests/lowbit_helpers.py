"""What the low-bit file tests share: the CLI in-process, a tiny render, PSNR."""

from __future__ import annotations

import numpy as np
from PIL import Image

import wgp_zimage


def cli(capsys, *args):
    rc = wgp_zimage.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def render(capsys, model_dir, out, *extra, model: str = "tiny") -> np.ndarray:
    """The CLI's 3-step 64x64 image of a fixed prompt and seed, as float64 pixels."""
    rc, _, err = cli(capsys, "generate", "--model", model, "--model-dir", str(model_dir), "--steps", "3", "--width",
                     "64", "--height", "64", "--seed", "5", "--prompt", "a red fox", "--output", str(out), *extra)
    assert rc == 0, err
    return np.asarray(Image.open(out)).astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
