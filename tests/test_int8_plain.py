"""int8 weights as plain tensors (models.lowbit.Int8Linear, `--int8-layers plain`): quanto's int8 data and
per-row scales without its tensor subclass, so that --compile traces the dequantization with the matmul
(issue 19: int8 at bf16's speed). The layer against a float64 product, the swap against quanto's own
dequantization, the images against quanto's int8 images, under a memory profile, compiled, with a LoRA."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from models.errors import UserError
from models.lowbit import Int8Linear, plain_int8_layers
from models.z_image.handler import HANDLER
from tests.conftest import cli, pixels


def test_the_layer_is_scale_times_int8_against_a_float64_product():
    g = torch.Generator().manual_seed(0)
    w8 = torch.randint(-127, 128, (24, 40), generator=g, dtype=torch.int8)
    scale = torch.rand(24, 1, generator=g) * 0.01 + 0.001
    bias = torch.randn(24, generator=g)
    layer = Int8Linear(w8, scale, bias, dtype=torch.float32)
    x = torch.randn(3, 5, 40, generator=g)
    want = x.double() @ (w8.double() * scale.double()).T + bias.double()
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
    assert layer.weight_int8.dtype == torch.int8 and not list(layer.parameters())[1:]  # the bias only
    layer.to(torch.bfloat16)  # a float cast: the compute dtype and scale follow, the int8 data stays
    assert layer.weight_int8.dtype == torch.int8 and layer.compute_device_dtype()[1] == torch.bfloat16
    rel = (layer(x.bfloat16()).double() - want).abs().max() / want.abs().max()
    assert rel < 2e-2
    with pytest.raises(ValueError, match="one scale per row"):
        Int8Linear(w8, torch.ones(3), dtype=torch.float32)


@pytest.fixture(scope="module")
def quantized(tiny_dir):
    pipe, parts = HANDLER.load_model(base_model_type="z_image_tiny", dtype=torch.bfloat16, VAE_dtype=torch.float32,
                                     model_dir=tiny_dir, transformer_quantization="int8")
    return parts["transformer"]


@pytest.mark.parametrize("with_mmgp", [False, True])
def test_the_swap_keeps_quanto_s_data_and_scales(tiny_dir, with_mmgp):
    from optimum.quanto import QModuleMixin as QLinear  # mmgp, once imported, makes its router class instead

    if with_mmgp:
        from models.mmgp_support import import_mmgp

        import_mmgp()
    model = HANDLER.load_model(base_model_type="z_image_tiny", dtype=torch.bfloat16, VAE_dtype=torch.float32,
                               model_dir=tiny_dir, transformer_quantization="int8")[1]["transformer"]
    quanto = {n: m.weight.dequantize() for n, m in model.named_modules() if isinstance(m, QLinear)}
    assert quanto
    assert plain_int8_layers(model) == len(quanto)
    plain = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert set(plain) == set(quanto) and not any(isinstance(m, QLinear) for m in model.modules())
    for name, layer in plain.items():
        assert torch.equal(layer.dequantized_weight(), quanto[name]), name  # bit for bit
    held = sum(m.weight_int8.numel() for m in plain.values())
    assert held == sum(m.in_features * m.out_features for m in plain.values())  # one byte a weight
    assert not hasattr(model, "_quanto_map")


def render_args(tiny_dir, out, *extra):
    return ("generate", "--model", "tiny", "--model-dir", str(tiny_dir), "--prompt", "a red fox", "--steps", "4",
            "--width", "64", "--height", "64", "--seed", "7", "--transformer-quantization", "int8", "--output",
            str(out), *extra)


def test_plain_int8_images_equal_quanto_s_within_one_level(tiny_dir, tmp_path, capsys, monkeypatch):
    import models.lowbit as lowbit

    swapped: list[int] = []
    real = lowbit.plain_int8_layers
    monkeypatch.setattr(lowbit, "plain_int8_layers", lambda model: swapped.append(real(model)) or swapped[-1])
    quanto, plain = tmp_path / "quanto.png", tmp_path / "plain.png"
    assert cli(capsys, *render_args(tiny_dir, quanto))[0] == 0
    assert swapped == []
    rc, _, err = cli(capsys, *render_args(tiny_dir, plain, "--int8-layers", "plain"))
    assert rc == 0, err
    assert len(swapped) == 1 and swapped[0] > 0  # the plain layers rendered it
    diff = np.abs(pixels(plain) - pixels(quanto))
    print(f"plain vs quanto int8: max {diff.max()}, mean {diff.mean():.4f}")
    assert diff.max() <= 1


def test_a_bad_choice_is_refused(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli(capsys, *render_args(tiny_dir, tmp_path / "x.png", "--int8-layers", "fast"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--int8-layers" in err and "Traceback" not in err
    with pytest.raises(UserError, match="quanto or plain"):
        HANDLER.load_model(base_model_type="z_image_tiny", dtype=torch.bfloat16, VAE_dtype=torch.float32,
                           model_dir=tiny_dir, int8_layers="fast")


def test_under_a_memory_profile_the_int8_blocks_stream(tiny_dir):
    from tests.test_offload import profiled_and_plain

    want, got, streamed = profiled_and_plain(lambda: HANDLER.load_model(
        base_model_type="z_image_tiny", dtype=torch.bfloat16, VAE_dtype=torch.float32, model_dir=tiny_dir,
        transformer_quantization="int8", int8_layers="plain"))
    assert np.array_equal(got, want)
    kinds = {(k, p.dtype) for m, k, p, _, _ in streamed if isinstance(m, Int8Linear)}
    assert ("weight_int8", torch.int8) in kinds and not any(k == "weight" for k, _ in kinds)


def test_compiled_plain_int8_blocks_match_eager(quantized):
    from models.z_image.transformer import compile_blocks

    model = quantized
    assert plain_int8_layers(model) > 0
    x, t = torch.randn(1, 16, 8, 8, dtype=torch.bfloat16), torch.rand(1)
    cap = torch.randn(20, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = model(x, t, [cap])
        torch._dynamo.reset()
        compile_blocks(model, backend="aot_eager")
        compiled = model(x, t, [cap])
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)


def test_a_lora_applies_to_plain_int8_layers(tiny_dir, tmp_path, capsys):
    from tests.test_lora_formats import load_tiny_transformer, write_lora

    lora, _ = write_lora(tmp_path, "kohya_musubi", load_tiny_transformer(tiny_dir), name="style")
    plain, styled = tmp_path / "plain.png", tmp_path / "styled.png"
    assert cli(capsys, *render_args(tiny_dir, plain, "--int8-layers", "plain"))[0] == 0
    rc, out, err = cli(capsys, *render_args(tiny_dir, styled, "--int8-layers", "plain", "--lora", str(lora)))
    assert rc == 0, err
    applied = re.search(r"(\d+) of (\d+) tensors applied", out + err)
    assert applied and applied.group(1) == applied.group(2) != "0"
    assert np.abs(pixels(styled) - pixels(plain)).mean() > 0.5
