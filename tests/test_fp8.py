"""fp8 single-file transformers: plain and ComfyUI "scaled fp8" files written here load through the CLI with
their weights kept in fp8, render close to the fp32 image, and `--save-quantized fp8` writes a file that
reads back to the same image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import wgp_zimage
from models.errors import UserError
from models.lowbit import Fp8Linear, lowbit_layers, quantize_fp8
from tests.lowbit_helpers import psnr, reference, render  # noqa: F401 (reference: a fixture)

# PSNR bounds (dB) against the fp32 image (tiny model, 3 steps at 64x64, fp32 compute), measured minus about
# 3 dB: scaled e4m3fn 40.5 / e5m2 35.0 (per-tensor scales), plain e4m3fn 41.1 (no scales), per-row scales 40.7
PSNR_BOUNDS = {"e4m3fn_scaled": 37, "e5m2_scaled": 32, "e4m3fn_plain": 38, "e4m3fn_rows": 37}
MEASURED: dict[str, float] = {}  # printed at the end of the run by conftest.pytest_terminal_summary
FP8 = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
KEPT = ("x_embedder", "final_layer", "t_embedder", "cap_embedder")  # kept in the compute dtype


def fp8_file(src, path, fmt="e4m3fn", scaled=True, per_row=False, scale_name="scale_weight"):
    """The ComfyUI single file src as an fp8 one: every 2-D weight but the embedders' and the final layer's
    in fp8; scaled: with ComfyUI's `scaled_fp8` marker and a float32 scale per weight (per_row: one per
    output row)."""
    dtype = FP8[fmt]
    out = {}
    for key, t in load_file(src).items():
        if t.ndim != 2 or not key.endswith(".weight") or any(k in key for k in KEPT):
            out[key] = t
            continue
        if not scaled:
            out[key] = t.to(dtype)
            continue
        if per_row:
            scale = t.abs().amax(dim=1, keepdim=True) / torch.finfo(dtype).max
            out[key] = (t / scale).to(dtype)
            out[key[: -len("weight")] + scale_name] = scale.reshape(-1)
        else:
            out[key], scale = quantize_fp8(t, dtype)
            out[key[: -len("weight")] + scale_name] = scale
        out[key[: -len("weight")] + "scale_input"] = torch.ones(())  # fp8 compute's: ignored
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=dtype)
    save_file(out, path)
    return path


@pytest.mark.parametrize("case", ["e4m3fn_scaled", "e5m2_scaled", "e4m3fn_plain", "e4m3fn_rows"])
def test_fp8_file_renders_close_to_the_fp32_image(case, tiny_dir, tiny_comfy_file, reference, tmp_path,  # noqa: F811
                                                  capsys):
    fmt, kind = case.split("_")
    path = fp8_file(tiny_comfy_file, tmp_path / f"z_image_{case}.safetensors", fmt, scaled=kind != "plain",
                    per_row=kind == "rows", scale_name="weight_scale" if kind == "rows" else "scale_weight")
    image = render(capsys, tiny_dir, tmp_path / "x.png", "--transformer", str(path))
    MEASURED[case] = psnr(image, reference)
    assert MEASURED[case] > PSNR_BOUNDS[case], MEASURED[case]


def test_fp8_weights_stay_fp8_in_memory(tiny_comfy_file, tmp_path):
    from models.z_image.lowbit import load_transformer_fp8

    path = fp8_file(tiny_comfy_file, tmp_path / "f.safetensors")
    model = load_transformer_fp8([path], None, torch.bfloat16, torch.device("cpu"))
    layers = lowbit_layers(model)
    assert "layers.0.attention.to_q" in layers and "layers.0.feed_forward.w2" in layers
    assert all(isinstance(m, Fp8Linear) and m.fp8_dtype == torch.float8_e4m3fn for m in layers.values())
    assert not any(n.startswith(("all_x_embedder", "all_final_layer", "t_embedder", "cap_embedder")) for n in layers)
    numel = sum(m.in_features * m.out_features for m in layers.values())
    held = sum(t.numel() * t.element_size() for m in layers.values() for t in m.buffers())
    assert held == numel + 4 * len(layers)  # one byte a weight and a float32 scale each
    # q, k and v cut from the fused qkv own their storage (a third each), with the fused weight's scale
    q = model.layers[0].attention
    assert q.to_q.weight_fp8.untyped_storage().nbytes() == 64 * 64
    assert torch.equal(q.to_q.weight_scale, q.to_k.weight_scale)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # mmgp's one-dtype assertion holds
    model.to(torch.float32)  # a float cast: the fp8 bytes and the float32 scale stay as they are
    layer = layers["layers.0.attention.to_q"]
    assert layer.weight_fp8.dtype == torch.uint8 and layer.weight_scale.dtype == torch.float32
    w = layer.dequantized_weight()
    assert w.dtype == torch.float32 and torch.equal(w, layer.fp8_weight.float() * layer.weight_scale)
    x = torch.randn(2, 64)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, w))


def test_save_quantized_fp8_writes_a_file_that_reads_back(tiny_dbm_dir, tmp_path, capsys):
    import shutil

    d = tmp_path / "dbm"
    shutil.copytree(tiny_dbm_dir, d)
    common = ("--dtype", "bf16")
    bf16 = render(capsys, d, tmp_path / "bf16.png", *common, model="base")
    fly = render(capsys, d, tmp_path / "fly.png", *common, "--save-quantized", "fp8", model="base")
    saved = d / "ZImageBase_fp8_e4m3fn_scaled.safetensors"
    assert saved.is_file()
    sd = load_file(saved)
    assert sd["scaled_fp8"].dtype == torch.float8_e4m3fn
    assert sd["layers.0.attention.to_q.weight"].dtype == torch.float8_e4m3fn
    assert sd["layers.0.attention.to_q.scale_weight"].dtype == torch.float32
    assert sd["all_x_embedder.2-1.weight"].dtype == torch.bfloat16
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:
        assert json.loads(f.metadata()["config"])["dim"] == 64
    again = render(capsys, d, tmp_path / "file.png", *common, "--transformer", str(saved), model="base")
    assert np.array_equal(fly, again)  # the file holds exactly the weights the run used
    MEASURED["save_quantized_bf16"] = psnr(fly, bf16)
    assert MEASURED["save_quantized_bf16"] > 35, MEASURED["save_quantized_bf16"]  # measured 38.8 (bf16 compute)
    # a bare --save-quantized (before the sub-command too) still means int8
    args = wgp_zimage.parse_args(["--save-quantized", "generate", "--prompt", "x"])
    assert args.save_quantized == "int8" and args.command == "generate"
    assert wgp_zimage.parse_args(["generate", "--save-quantized", "fp8", "--prompt", "x"]).save_quantized == "fp8"


def test_fp8_file_with_a_stray_scale_is_refused(tiny_comfy_file, tmp_path):
    from models.z_image.lowbit import load_transformer_fp8

    path = fp8_file(tiny_comfy_file, tmp_path / "f.safetensors")
    sd = load_file(path)
    sd["model.diffusion_model.layers.0.attention.extra.scale_weight"] = torch.ones(())
    save_file(sd, path)
    with pytest.raises(UserError, match=r"1 unexpected keys \(first: layers\.0\.attention\.extra\.scale_weight\)"):
        load_transformer_fp8([path], None, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("per_row", [False, True])
def test_under_a_memory_profile_the_fp8_bytes_are_what_streams(tiny_dir, tiny_comfy_file, tmp_path, per_row):
    """mmgp (its real code on the CPU stand-ins) streams an fp8 transformer's blocks as they are held: uint8
    bytes and float32 scales; the image equals the unprofiled fp8 one."""
    from models.z_image.handler import HANDLER
    from tests.test_offload import profiled_and_plain

    path = fp8_file(tiny_comfy_file, tmp_path / "fp8.safetensors", per_row=per_row)
    want, got, streamed = profiled_and_plain(lambda: HANDLER.load_model(
        base_model_type="z_image_tiny", model_filename=path, dtype=torch.bfloat16, VAE_dtype=torch.float32,
        model_dir=tiny_dir))
    assert np.array_equal(got, want)
    kinds = {(k, p.dtype) for m, k, p, _, _ in streamed if isinstance(m, Fp8Linear)}
    assert ("weight_fp8", torch.uint8) in kinds and ("weight_scale", torch.float32) in kinds
    assert not any(k == "weight" for k, _ in kinds)
