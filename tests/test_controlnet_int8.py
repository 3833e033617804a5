"""int8 ControlNet files (quanto, as DeepBeepMeep's `*_quanto_bf16_int8` repacks): they load with their weights
kept int8, compute what the dequantized weights compute, render close to the bf16 ControlNet, and the ControlNet
types take them beside an int8 transformer."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.z_image import controlnet as zc
from models.z_image import quantize as q
from models.z_image.handler import HANDLER
from models.z_image.tiny import TINY_TRANSFORMER, write_tiny_controlnet
from models.z_image.transformer import ZImageConfig
from tests.conftest import cli, pixels
from tests.lowbit_helpers import psnr
from tests.test_controlnet_cli import write_net

CONFIG = ZImageConfig.from_dict(TINY_TRANSFORMER)


def int8_copy(net: zc.ZImageControlNet, path: Path) -> Path:
    q.quantize_on_the_fly(net)
    return q.save_quantized(net, path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """bf16 and int8 files of a 1.0-style single file and a 2.1 diffusers folder."""
    root = tmp_path_factory.mktemp("controlnet_int8")
    v1 = write_net(root / "v1_bf16.safetensors", "1.0")
    v1_int8 = int8_copy(zc.load_controlnet(v1, CONFIG, torch.float32), root / "v1_quanto_bf16_int8.safetensors")
    v21 = write_tiny_controlnet(root / "v21")
    v21_int8 = root / "v21_int8"
    v21_int8.mkdir()
    shutil.copyfile(v21 / "config.json", v21_int8 / "config.json")
    int8_copy(zc.load_controlnet(v21, CONFIG, torch.float32), v21_int8 / "diffusion_pytorch_model.safetensors")
    return {"v1": v1, "v1_int8": v1_int8, "v21": v21, "v21_int8": v21_int8}


def dequantized(net: zc.ZImageControlNet) -> zc.ZImageControlNet:
    """A plain float32 copy of an int8 net, each weight quanto's own dequantization of its int8 data."""
    from optimum.quanto import QTensor

    plain = zc.ZImageControlNet(net.config)
    state = {}
    for name, module in net.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            key = f"{name}.{pname}" if name else pname
            state[key] = (p.dequantize() if isinstance(p, QTensor) else p.detach()).float()
    plain.load_state_dict(state, strict=True)
    return plain


@pytest.mark.parametrize("version", ["v1", "v21"])
def test_an_int8_file_loads_int8_and_computes_its_dequantized_weights(files, version):
    from optimum.quanto import QTensor

    net = zc.load_controlnet(files[f"{version}_int8"], CONFIG, torch.float32)
    assert net.config.version == ("1.0" if version == "v1" else "2.1")
    weights = dict(net.named_parameters())
    assert isinstance(weights["control_layers.0.attention.to_q.weight"], QTensor)
    assert weights["control_layers.0.attention.to_q.weight"]._data.dtype == torch.int8
    assert not isinstance(weights[f"control_all_x_embedder.{net._key}.weight"], QTensor)  # kept in float
    plain = dequantized(net)
    # each int8 weight is the file's float weight rounded on its row's absmax / 127 grid (computed here)
    original = dict(zc.load_controlnet(files[version], CONFIG, torch.float32).named_parameters())
    checked = 0
    for key, w in dict(plain.named_parameters()).items():
        if isinstance(weights[key], QTensor):
            step = original[key].abs().amax(dim=1, keepdim=True) / 127
            assert ((w - original[key]).abs() <= step / 2 + 1e-6).all(), key
            checked += 1
    assert checked >= 4 * len(net.control_layers)
    block, ref = net.control_layers[1], plain.control_layers[1]
    gen = torch.Generator().manual_seed(0)
    c, x = (torch.randn(1, 24, CONFIG.dim, generator=gen) for _ in range(2))
    adaln = torch.randn(1, min(CONFIG.dim, 256), generator=gen)
    from models.z_image.transformer import ZImageTransformer

    ids = torch.zeros(24, 3, dtype=torch.long)
    ids[:, 1] = torch.arange(24)
    freqs = ZImageTransformer(CONFIG).rope.lookup(ids)
    got, hint = block(c, x, freqs, adaln)
    want, want_hint = ref(c, x, freqs, adaln)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hint, want_hint, rtol=1e-4, atol=1e-4)


def test_an_int8_controlnet_renders_close_to_its_bf16_file(tiny_dir, files, tmp_path, capsys):
    pic = tmp_path / "map.png"
    from PIL import Image

    y, x = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([x * 4, y * 4, 255 - x * 2], -1).astype(np.uint8)).save(pic)
    outs = {}
    for name in ("v1", "v1_int8"):
        outs[name] = tmp_path / f"{name}.png"
        rc, _, err = cli(capsys, "generate", "--model", "tiny", "--model-dir", str(tiny_dir), "--prompt", "a cat",
                         "--steps", "3", "--seed", "5", "--width", "64", "--height", "64", "--controlnet",
                         str(files[name]), "--control-image", str(pic), "--output", str(outs[name]))
        assert rc == 0, err
    plain = tmp_path / "plain.png"
    assert cli(capsys, "generate", "--model", "tiny", "--model-dir", str(tiny_dir), "--prompt", "a cat", "--steps",
               "3", "--seed", "5", "--width", "64", "--height", "64", "--output", str(plain))[0] == 0
    close, apart = psnr(pixels(outs["v1_int8"]), pixels(outs["v1"])), psnr(pixels(outs["v1"]), pixels(plain))
    print(f"int8 ControlNet vs bf16: {close:.1f} dB; bf16 ControlNet vs none: {apart:.1f} dB")
    assert close >= 30 and close > apart + 10  # int8 keeps what the ControlNet does


def test_the_controlnet_types_take_the_int8_file_beside_an_int8_transformer(tmp_path):
    from models.registry import load_definitions

    d = load_definitions()[0]["z_image_control2"]
    stem = "Z-Image-Turbo-Fun-Controlnet-Union2"
    bf16 = tmp_path / f"{stem}_bf16.safetensors"
    bf16.write_bytes(b"x")
    assert HANDLER.controlnet_file(d, tmp_path, "int8") == bf16  # no int8 file there yet
    int8 = tmp_path / f"{stem}_quanto_bf16_int8.safetensors"
    int8.write_bytes(b"x")
    assert HANDLER.controlnet_file(d, tmp_path, "int8") == int8
    assert HANDLER.controlnet_file(d, tmp_path, "bf16") == bf16


def test_a_bf16_controlnet_beside_int8_weights_is_quantized_too(tiny_dir, tmp_path):
    """A ControlNet type without an int8 file (Tile 2.1) or a bf16 --controlnet: with int8 transformer weights
    the ControlNet's blocks are quantized as they load, not kept at full size beside them."""
    from optimum.quanto import QTensor

    model_dir = shutil.copytree(tiny_dir, tmp_path / "m")
    pipe, _ = HANDLER.load_model(base_model_type="z_image_tiny_control", dtype=torch.bfloat16,
                                 VAE_dtype=torch.float32, model_dir=model_dir, transformer_quantization="int8")
    weights = dict(pipe.controlnet.named_parameters())
    assert isinstance(weights["control_layers.0.attention.to_q.weight"], QTensor)
    assert not isinstance(weights[f"control_all_x_embedder.{pipe.controlnet._key}.weight"], QTensor)
    assert not any(p.requires_grad for p in pipe.controlnet.parameters())
    pipe, _ = HANDLER.load_model(base_model_type="z_image_tiny_control", dtype=torch.bfloat16,
                                 VAE_dtype=torch.float32, model_dir=model_dir)
    assert not any(isinstance(p, QTensor) for p in pipe.controlnet.parameters())  # bf16 stays bf16
    assert not any(p.requires_grad for p in pipe.controlnet.parameters())
