"""FP8 compute: an Fp8Linear with fp8_compute multiplies per-token e4m3fn activations by its fp8 weight through
torch._scaled_mm (which runs on this CPU): checked against a float64 product of the same quantized operands,
quantized here by their own formula; layers _scaled_mm cannot take fall back to the dequantized product; the
tiny model renders close to its bf16 image with --fp8-compute; a device without fp8 products falls back, said
once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.lowbit import Fp8Linear, fp8_compute_problem, quantize_fp8, set_fp8_compute
from tests.conftest import cli
from tests.lowbit_helpers import psnr, render_args
from tests.test_fp8 import fp8_file

pytestmark = pytest.mark.skipif(fp8_compute_problem(torch.device("cpu"), torch.float32) is not None,
                                reason="this torch runs no torch._scaled_mm on the CPU")

E4M3 = torch.float8_e4m3fn
# PSNR bound (dB) of the tiny image (bf16 compute, 3 steps at 64x64) with fp8 compute against the bf16 weights'
# image: measured 36.6 (the same fp8 file without fp8 compute: 40.4 against this one), minus about 3 dB
FP8_COMPUTE_BOUND = 33
MEASURED: dict[str, float] = {}  # printed at the end of the run by conftest.pytest_terminal_summary


def reference_product(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None):
    """float64 (x_q @ W^T (+ bias), |x_q| @ |W|^T (+ |bias|)): each row of x scaled so its largest magnitude
    is e4m3fn's 448, cast to e4m3fn and scaled back (a zero row stays zero); W the fp8 weight times its scale."""
    rows = x.reshape(-1, x.shape[-1]).float()
    s = rows.abs().max(dim=1).values[:, None] / 448.0
    xq = torch.where(s > 0, rows / s, 0.0).clamp(-448.0, 448.0).to(E4M3).double() * s.double()  # a zero row: 0
    w = weight.double() * (w_scale.double().reshape(-1, 1) if w_scale.numel() > 1 else w_scale.double())
    out, magnitude = xq @ w.T, xq.abs() @ w.abs().T  # magnitude: what rounding errors scale with
    if bias is not None:
        out, magnitude = out + bias.double(), magnitude + bias.double().abs()
    shape = (*x.shape[:-1], weight.shape[0])
    return out.reshape(shape), magnitude.reshape(shape)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_compute_linear_matches_a_float64_product_of_the_quantized_operands(per_row, dtype):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 64, generator=gen) * 0.05
    if per_row:
        w = w * torch.linspace(0.2, 3.0, 48)[:, None]  # rows of different ranges: the per-row scales matter
        scale = w.abs().amax(dim=1) / 448.0
        weight = (w / scale[:, None]).to(E4M3)
    else:
        weight, scale = quantize_fp8(w)
    bias = torch.randn(48, generator=gen)
    layer = Fp8Linear(weight, scale, bias, dtype)
    x = (torch.randn(2, 7, 64, generator=gen) * torch.logspace(-2, 2, 7)[None, :, None]).to(dtype)  # token ranges
    x[1, 3] = 0  # an all-zero token stays zero
    dequantized = layer(x)
    assert set_fp8_compute(layer, True) == (1, 0) and layer.fp8_compute
    out = layer(x)
    assert out.dtype == dtype and out.shape == (2, 7, 48)
    ref, magnitude = reference_product(x, weight, scale, layer.bias)
    err = (out.double() - ref).abs()
    # float32: accumulation order only (64 terms); bf16: the product's and the bias sum's roundings (2^-9 each)
    rel = 1e-5 if dtype == torch.float32 else 2**-8
    assert (err <= rel * magnitude).all(), (err / magnitude).max()
    # the bound tells quantized activations from unquantized ones: the dequantized product breaks it
    assert ((dequantized.double() - ref).abs() > rel * magnitude).any()


def test_layers_scaled_mm_cannot_take_keep_the_dequantized_product():
    gen = torch.Generator().manual_seed(4)
    odd = Fp8Linear(*quantize_fp8(torch.randn(170, 64, generator=gen)), None, torch.float32)  # 170: not 16k
    e5m2 = Fp8Linear(*quantize_fp8(torch.randn(64, 64, generator=gen), torch.float8_e5m2), None, torch.float32)
    adaln = Fp8Linear(*quantize_fp8(torch.randn(64, 64, generator=gen)), None, torch.float32)
    model = torch.nn.ModuleDict({"odd": odd, "e5m2": e5m2, "adaLN_modulation": adaln})
    assert set_fp8_compute(model, True, skip=("adaLN",)) == (0, 3)
    for layer in (odd, e5m2, adaln):
        x = torch.randn(5, 64, generator=gen)
        assert not layer.fp8_compute
        assert torch.equal(layer(x), F.linear(x, layer.fp8_weight.float() * layer.weight_scale))
    assert set_fp8_compute(torch.nn.ModuleDict({"a": adaln}), True) == (1, 0)
    assert set_fp8_compute(model, False) == (0, 3) and not adaln.fp8_compute


def test_a_gpu_under_compute_capability_8_9_has_no_fp8_compute(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    problem = fp8_compute_problem(torch.device("cuda"), torch.bfloat16)
    assert problem == "NVIDIA GeForce RTX 3090 has compute capability 8.6 (fp8 needs 8.9+)"
    monkeypatch.delattr(torch, "_scaled_mm")
    assert "has no torch._scaled_mm" in fp8_compute_problem(torch.device("cpu"), torch.float32)


def image(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path)).astype(np.float64)


def test_fp8_compute_renders_close_to_the_bf16_image(tiny_dir, tiny_comfy_file, tmp_path, capsys):
    path = fp8_file(tiny_comfy_file, tmp_path / "z_image_fp8.safetensors")
    bf16 = ("--dtype", "bf16", "-v")
    runs = {}
    for name, extra in {"bf16": (), "fp8": ("--transformer", str(path)),
                        "fp8_compute": ("--transformer", str(path), "--fp8-compute")}.items():
        rc, _, err = cli(capsys, *render_args(tiny_dir, tmp_path / f"{name}.png", *bf16, *extra))
        assert rc == 0, err
        runs[name] = (image(tmp_path / f"{name}.png"), err)
    # both paths: the 64-wide attention layers in fp8, the 170-wide feed-forward ones and adaLN's dequantized
    assert "fp8 compute: 16 linear layers through torch._scaled_mm (per-token activation scales), 15 fp8 " \
           "layers dequantized" in runs["fp8_compute"][1]
    assert "fp8 compute" not in runs["fp8"][1]  # not on the CPU unless asked for
    assert not np.array_equal(runs["fp8_compute"][0], runs["fp8"][0])
    MEASURED["fp8_compute_vs_bf16"] = psnr(runs["fp8_compute"][0], runs["bf16"][0])
    MEASURED["fp8_compute_vs_fp8"] = psnr(runs["fp8_compute"][0], runs["fp8"][0])
    MEASURED["fp8_vs_bf16"] = psnr(runs["fp8"][0], runs["bf16"][0])
    print({k: round(v, 1) for k, v in MEASURED.items()})
    assert MEASURED["fp8_compute_vs_bf16"] > FP8_COMPUTE_BOUND, MEASURED


def test_fp8_compute_without_scaled_mm_falls_back_said_once(tiny_dir, tiny_comfy_file, tmp_path, capsys,
                                                             monkeypatch):
    path = fp8_file(tiny_comfy_file, tmp_path / "z_image_fp8.safetensors")
    args = ("--dtype", "bf16", "--transformer", str(path))
    rc, _, err = cli(capsys, *render_args(tiny_dir, tmp_path / "plain.png", *args))
    assert rc == 0, err
    monkeypatch.delattr(torch, "_scaled_mm")
    rc, _, err = cli(capsys, *render_args(tiny_dir, tmp_path / "asked.png", *args, "--fp8-compute"))
    assert rc == 0, err
    lines = [line for line in err.splitlines() if "fp8 compute unavailable" in line]
    assert len(lines) == 1 and "has no torch._scaled_mm" in lines[0] and "dequantized per layer" in lines[0], err
    assert np.array_equal(image(tmp_path / "asked.png"), image(tmp_path / "plain.png"))  # the fallback's image


def test_the_option_reaches_the_service_config():
    import wgp_zimage
    from app.service import ServiceConfig

    def config(*extra: str) -> ServiceConfig:
        return ServiceConfig.from_args(wgp_zimage.parse_args(["generate", "--prompt", "x", *extra]))

    assert config().fp8_compute is None  # automatic: CUDA with compute capability 8.9+
    assert config("--fp8-compute").fp8_compute is True
    assert config("--no-fp8-compute").fp8_compute is False
    assert ServiceConfig.from_args(wgp_zimage.parse_args(["--fp8-compute", "generate", "--prompt", "x"])).fp8_compute
