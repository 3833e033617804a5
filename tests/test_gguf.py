"""GGUF transformers: torch dequantization against gguf's numpy one, files written here with the gguf
package's writer (and its quantizers, or the small K-quant encoders below) loaded through the CLI, the
quantized weights kept quantized in memory, and the errors for files that are not ours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from models.errors import UserError
from models.ggml import SUPPORTED_TYPES, dequantize, read_gguf
from tests.conftest import to_comfy
from tests.lowbit_helpers import cli, psnr, reference, render  # noqa: F401 (reference: a fixture)

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
QK_K = 256

# PSNR bounds (dB) of each file's image against the fp32 safetensors image (3 steps at 64x64, fp32 compute):
# measured minus about 3 dB. Tiny model (dim 64) for the block-32 types (measured F16 65.9, BF16 57.4, Q8_0
# 51.6, Q5_0 33.1, Q4_0 28.9), the 256-wide one for the K-quants, encoded by the plain encoder below, not
# llama.cpp's searching one (Q6_K 41.4, Q5_K 38.2, Q4_K 32.3)
PSNR_BOUNDS = {"F16": 62, "BF16": 54, "Q8_0": 48, "Q5_0": 30, "Q4_0": 26, "Q6_K": 38, "Q5_K": 35, "Q4_K": 29}
MEASURED: dict[str, float] = {}  # printed at the end of the run by conftest.pytest_terminal_summary


# ------------------------------------------------------------------ writing GGUF files

def kquant_blocks(x: np.ndarray, qtype) -> np.ndarray:
    """A plain (not llama.cpp's searching) encoder of float32 rows into Q4_K / Q5_K / Q6_K blocks."""
    b = x.reshape(-1, QK_K).astype(np.float32)
    n = b.shape[0]
    f16 = lambda v: v.astype(np.float16)
    if qtype == T.Q6_K:
        sub = b.reshape(n, 16, 16)
        s = np.abs(sub).max(-1) / 32
        d = f16(s.max(-1, keepdims=True) / 127)
        sc = np.where(d > 0, np.round(s / np.where(d > 0, d, 1)), 0).clip(0, 127).astype(np.int8)
        eff = d.astype(np.float32)[..., None] * sc[..., None]
        q = np.where(eff > 0, np.round(sub / np.where(eff > 0, eff, 1)), 0).clip(-32, 31).astype(np.int16) + 32
        u = q.reshape(n, QK_K).astype(np.uint8)
        ul, uh = (u & 0xF).reshape(n, 2, 2, 64), (u >> 4).reshape(n, 2, 4, 32)
        ql = (ul[:, :, 0] | (ul[:, :, 1] << 4)).reshape(n, 128)
        qh = (uh[:, :, 0] | (uh[:, :, 1] << 2) | (uh[:, :, 2] << 4) | (uh[:, :, 3] << 6)).reshape(n, 64)
        return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8)], axis=1)
    levels = 15 if qtype == T.Q4_K else 31
    sub = b.reshape(n, 8, 32)
    mn = np.minimum(sub.min(-1), 0)
    s = (sub.max(-1) - mn) / levels
    d, dmin = f16(s.max(-1, keepdims=True) / 63), f16(-mn.min(-1, keepdims=True) / 63)
    safe = lambda v: np.where(v > 0, v, 1)
    sc = np.where(d > 0, np.round(s / safe(d.astype(np.float32))), 0).clip(0, 63).astype(np.uint8)
    m = np.where(dmin > 0, np.round(-mn / safe(dmin.astype(np.float32))), 0).clip(0, 63).astype(np.uint8)
    eff_s = d.astype(np.float32) * sc
    eff_m = dmin.astype(np.float32) * m
    q = np.where(eff_s[..., None] > 0, np.round((sub + eff_m[..., None]) / safe(eff_s)[..., None]), 0)
    q = q.clip(0, levels).astype(np.uint8)  # (n, 8, 32)
    scales = np.concatenate([(sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6), (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)], axis=1)
    low = q & 0xF
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(n, 128)
    parts = [d.view(np.uint8), dmin.view(np.uint8), scales]
    if qtype == T.Q5_K:
        high = (q >> 4).transpose(0, 2, 1)  # (n, 32, 8): element j of sub-block i is bit i of byte j
        parts.append((high << np.arange(8, dtype=np.uint8)).sum(-1, dtype=np.uint16).astype(np.uint8))
    return np.concatenate([*parts, qs], axis=1)


def random_blocks(qtype, n: int, rng) -> np.ndarray:
    """n blocks of random bytes whose fp16 scales are finite and small (so the weights are)."""
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    offsets = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q2_K: [80, 82],
               T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}[qtype]
    for off in offsets:
        raw[:, off:off + 2] = (rng.uniform(0.0002, 0.002, (n, 1))).astype(np.float16).view(np.uint8)
    return raw


def encode(data: np.ndarray, qtype, rng=None) -> tuple[np.ndarray, object]:
    """data (float32) as qtype blocks shaped (rows, bytes per row), ComfyUI-GGUF's converter's way: 1-D and
    tiny tensors F32, rows whose length fits no block F16."""
    if data.ndim == 1 or data.size <= 1024:
        return data.astype(np.float32), T.F32
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if data.shape[-1] % block:
        return data.astype(np.float16), T.F16
    if qtype in (T.Q4_K, T.Q5_K, T.Q6_K) and rng is None:
        blocks = kquant_blocks(data, qtype)
    elif qtype in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K):
        blocks = random_blocks(qtype, data.size // block, rng)
    else:
        return gguf.quants.quantize(data, qtype), qtype
    return blocks.reshape(data.shape[0], -1), qtype


def write_gguf(path, sd: dict[str, torch.Tensor], qtype, arch="lumina2", rng=None, reshaped=()):
    """sd (names as in the file) as a GGUF file of qtype; `reshaped` names tensors stored (n/256, 256) with
    ComfyUI-GGUF's `comfy.gguf.orig_shape` metadata."""
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for key, t in sd.items():
        data = t.float().numpy()
        if key in reshaped:
            writer.add_array(f"comfy.gguf.orig_shape.{key}", list(data.shape))
            data = data.reshape(-1, 256)
        blocks, kind = encode(data, qtype, rng)
        writer.add_tensor(key, blocks, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def comfy_sd(path) -> dict[str, torch.Tensor]:
    """A ComfyUI single file's tensors as ComfyUI-GGUF's converter names them (its prefix stripped)."""
    return {k.removeprefix("model.diffusion_model."): v for k, v in load_file(path).items()}


@pytest.fixture(scope="module")
def wide_file(tmp_path_factory):
    """A random transformer 256 wide (K-quant blocks need rows of 256) beside the tiny text encoder and VAE,
    as a ComfyUI single file without config (its architecture is read from the shapes)."""
    from models.z_image.tiny import TINY_TRANSFORMER, _randomize
    from models.z_image.transformer import ZImageConfig, ZImageTransformer

    cfg = ZImageConfig.from_dict({**TINY_TRANSFORMER, "dim": 256, "n_heads": 8, "n_kv_heads": 8})
    model = ZImageTransformer(cfg)
    _randomize(model, torch.Generator().manual_seed(3), 1.0)
    sd = to_comfy({k: v.contiguous() for k, v in model.state_dict().items()})
    sd["model.diffusion_model.norm_final.weight"] = torch.ones(256)
    path = tmp_path_factory.mktemp("wide") / "wide.safetensors"
    save_file(sd, path)
    return path


# ------------------------------------------------------------------ dequantization

@pytest.mark.parametrize("name", SUPPORTED_TYPES)
def test_dequantize_is_bit_exact_with_gguf_numpy(name):
    qtype = T[name]
    rng = np.random.default_rng(qtype.value)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if name in ("F32", "F16", "BF16"):
        values = (rng.standard_normal(3 * 512) * 10.0 ** rng.integers(-4, 4, 3 * 512)).astype(np.float32)
        raw = gguf.quants.quantize(values, qtype).view(np.uint8).reshape(3, -1)
    else:
        raw = random_blocks(qtype, 3 * (512 // block), rng).reshape(3, -1)
    expected = gguf.quants.dequantize(raw, qtype).reshape(3, 512)  # F32 / F16: it views the bytes
    ours = dequantize(torch.from_numpy(raw.copy()), qtype.value, (3, 512)).numpy()
    assert ours.dtype == np.float32 and np.array_equal(ours.view(np.uint32), expected.view(np.uint32))
    assert dequantize(torch.from_numpy(raw.copy()), qtype.value, (3, 512), torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K, T.Q6_K])
def test_test_encoders_make_valid_kquant_blocks(qtype):
    x = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32) * 0.1
    back = gguf.quants.dequantize(kquant_blocks(x, qtype).reshape(4, -1), qtype)
    rel = np.linalg.norm(back - x) / np.linalg.norm(x)
    assert rel < {T.Q4_K: 0.12, T.Q5_K: 0.06, T.Q6_K: 0.03}[qtype], rel


# ------------------------------------------------------------------ rendering through the CLI

@pytest.mark.parametrize("name", ["F16", "BF16", "Q8_0", "Q5_0", "Q4_0"])
def test_gguf_file_renders_close_to_the_safetensors_image(name, tiny_dir, tiny_comfy_file, reference, tmp_path,  # noqa: F811
                                                          capsys):
    path = write_gguf(tmp_path / f"z_image_{name}.gguf", comfy_sd(tiny_comfy_file), T[name])
    image = render(capsys, tiny_dir, tmp_path / "x.png", "--transformer", str(path))
    MEASURED[name] = psnr(image, reference)
    assert MEASURED[name] > PSNR_BOUNDS[name], MEASURED[name]


@pytest.mark.parametrize("name", ["Q6_K", "Q5_K", "Q4_K"])
def test_kquant_file_renders_close_to_the_safetensors_image(name, tiny_dir, wide_file, tmp_path, capsys):
    ref = render(capsys, tiny_dir, tmp_path / "ref.png", "--transformer", str(wide_file))
    path = write_gguf(tmp_path / f"wide_{name}.gguf", comfy_sd(wide_file), T[name])
    image = render(capsys, tiny_dir, tmp_path / "x.png", "--transformer", str(path))
    MEASURED[name] = psnr(image, ref)
    assert MEASURED[name] > PSNR_BOUNDS[name], MEASURED[name]


def test_random_kquant_blocks_load_exactly_and_render(tiny_dir, wide_file, tmp_path, capsys):
    """Q3_K and Q2_K (no encoder here): random blocks with valid scales; every quantized weight of the loaded
    model (q, k, v cut from the fused qkv blocks) equals gguf's numpy dequantization of the file's blocks."""
    from models.lowbit import GGUFLinear
    from models.z_image.lowbit import load_transformer_gguf

    sd = comfy_sd(wide_file)
    for name in ("Q3_K", "Q2_K"):
        path = write_gguf(tmp_path / f"wide_{name}.gguf", sd, T[name], rng=np.random.default_rng(1))
        model = load_transformer_gguf(path, None, torch.float32, torch.device("cpu"))
        reader = gguf.GGUFReader(str(path))
        blocks = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
        q = model.layers[1].attention
        fused = blocks["layers.1.attention.qkv.weight"]
        for i, part in enumerate((q.to_q, q.to_k, q.to_v)):
            assert isinstance(part, GGUFLinear) and part.qtype == T[name].value
            assert torch.equal(part.dequantized_weight(), torch.from_numpy(fused[i * 256:(i + 1) * 256]))
        w1 = model.noise_refiner[0].feed_forward.w1
        assert torch.equal(w1.dequantized_weight(), torch.from_numpy(blocks["noise_refiner.0.feed_forward.w1.weight"]))
        image = render(capsys, tiny_dir, tmp_path / f"{name}.png", "--transformer", str(path))
        assert np.isfinite(image).all() and image.std() > 0


def test_gguf_in_bf16_with_int8_asked_and_a_reshaped_tensor(tiny_dir, tiny_comfy_file, tmp_path, capsys):
    """bf16 compute works; an int8 request leaves GGUF weights alone (nothing quanto); a tensor stored reshaped
    with ComfyUI-GGUF's orig_shape metadata reads back as the plain file's."""
    sd = comfy_sd(tiny_comfy_file)
    plain = write_gguf(tmp_path / "plain.gguf", sd, T.Q8_0)
    reshaped = write_gguf(tmp_path / "reshaped.gguf", sd, T.Q8_0, reshaped={"layers.0.attention.qkv.weight"})
    common = ("--dtype", "bf16", "--transformer-quantization", "int8")
    a = render(capsys, tiny_dir, tmp_path / "a.png", "--transformer", str(plain), *common)
    b = render(capsys, tiny_dir, tmp_path / "b.png", "--transformer", str(reshaped), *common)
    assert np.array_equal(a, b)


# ------------------------------------------------------------------ memory and module behaviour

def test_quantized_linears_hold_their_blocks_only(tiny_comfy_file, tmp_path):
    from models.lowbit import GGUFLinear, lowbit_layers
    from models.z_image.lowbit import load_transformer_gguf

    path = write_gguf(tmp_path / "q4.gguf", comfy_sd(tiny_comfy_file), T.Q4_0)
    model = load_transformer_gguf(path, None, torch.bfloat16, torch.device("cpu"))
    layers = lowbit_layers(model)
    assert layers and all(isinstance(m, GGUFLinear) for m in layers.values())
    assert "layers.0.feed_forward.w1" in layers and "layers.0.feed_forward.w2" not in layers  # 170 wide: F16
    assert not any(n.startswith(("all_x_embedder", "all_final_layer", "t_embedder", "cap_embedder")) for n in layers)
    numel = sum(m.in_features * m.out_features for m in layers.values())
    held = sum(t.numel() * t.element_size() for m in layers.values() for t in m.buffers())
    assert held == numel // 32 * 18  # Q4_0: 18 bytes per 32 weights, not 2 bytes per weight
    params = sum(p.numel() * p.element_size() for m in layers.values() for p in m.parameters())
    assert params == sum(0 if m.bias is None else m.bias.numel() * 2 for m in layers.values())
    # mmgp asserts that all parameters share the model dtype: the blocks are uint8 buffers
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {b.dtype for m in layers.values() for b in m.buffers()} == {torch.uint8}
    model.to(torch.float32)  # a float cast changes the compute dtype, never the blocks
    layer = layers["layers.0.attention.to_q"]
    assert layer.weight_raw.dtype == torch.uint8 and layer.compute_device_dtype()[1] == torch.float32
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.dequantized_weight()))


def test_a_lora_goes_on_gguf_layers(tiny_comfy_file, tmp_path):
    from models.lora_runtime import ModuleDelta, _Active, _Branch, base_weight
    from models.z_image.lowbit import load_transformer_gguf

    path = write_gguf(tmp_path / "q8.gguf", comfy_sd(tiny_comfy_file), T.Q8_0)
    layer = load_transformer_gguf(path, None, torch.float32, torch.device("cpu")).layers[0].attention.to_q
    assert torch.equal(base_weight(layer), layer.dequantized_weight(torch.float32))
    g = torch.Generator().manual_seed(0)
    md = ModuleDelta(up=torch.randn(64, 4, generator=g), down=torch.randn(4, 64, generator=g), scale=0.5)
    owner = _Active.__new__(_Active)
    owner.tensor = torch.tensor(1.0)
    branch = _Branch(md, layer, owner)
    x = torch.randn(2, 64, generator=g)
    out = branch(layer, x, layer(x))
    want = x @ (layer.dequantized_weight() + 0.5 * md.up @ md.down).T
    assert torch.allclose(layer(x) + out, want, atol=1e-4)


# ------------------------------------------------------------------ files that are not ours

def test_another_architecture_names_its_keys(tiny_dir, tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    flux = {"double_blocks.0.img_attn.qkv.weight": torch.randn(192, 64, generator=g),
            "double_blocks.0.img_attn.proj.weight": torch.randn(64, 64, generator=g),
            "img_in.weight": torch.randn(64, 64, generator=g)}
    path = write_gguf(tmp_path / "flux-Q8_0.gguf", flux, T.Q8_0, arch="flux")
    with pytest.raises(UserError, match=r"not a Z-Image transformer \(GGUF architecture 'flux'\).*missing keys "
                                        r"\(first: .*unexpected keys \(first: double_blocks"):
        from models.z_image.lowbit import load_transformer_gguf

        load_transformer_gguf(path, None, torch.float32, torch.device("cpu"))
    rc, _, err = cli(capsys, "generate", "--model", "tiny", "--model-dir", str(tiny_dir), "--prompt", "x",
                     "--transformer", str(path), "--output", str(tmp_path / "x.png"))
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "not a Z-Image transformer" in errors[0], err


def test_a_z_image_file_with_a_stray_or_missing_tensor_is_named(tiny_comfy_file, tmp_path):
    from models.z_image.lowbit import load_transformer_gguf

    sd = comfy_sd(tiny_comfy_file)
    sd["layers.0.attention.extra.weight"] = torch.zeros(64, 64)
    del sd["layers.1.feed_forward.w3.weight"]
    path = write_gguf(tmp_path / "odd.gguf", sd, T.Q8_0)
    with pytest.raises(UserError, match=r"1 missing keys \(first: layers\.1\.feed_forward\.w3\.weight\); "
                                        r"1 unexpected keys \(first: layers\.0\.attention\.extra\.weight\)"):
        load_transformer_gguf(path, None, torch.float32, torch.device("cpu"))


def test_an_unsupported_quant_type_is_named(tiny_comfy_file, tmp_path):
    sd = comfy_sd(tiny_comfy_file)
    writer = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), arch="lumina2")
    for key, t in sd.items():
        writer.add_tensor(key, t.float().numpy())
    _, size = gguf.GGML_QUANT_SIZES[T.IQ4_NL]
    writer.add_tensor("layers.9.extra.weight", np.zeros((64, 64 // 32 * size), np.uint8), raw_dtype=T.IQ4_NL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match=r"unsupported GGUF tensor type IQ4_NL \(e\.g\. 'layers\.9\.extra\.weight'\)"):
        read_gguf(tmp_path / "iq.gguf")


@pytest.mark.parametrize("profile_no", [2, 4])
def test_under_a_memory_profile_the_quantized_blocks_are_what_streams(tiny_dir, tiny_comfy_file, tmp_path,
                                                                       profile_no):
    """mmgp (its real code on the CPU stand-ins) streams a GGUF transformer's blocks as they are held: the uint8
    GGML blocks, not a dequantized copy; the image equals the unprofiled GGUF one."""
    import numpy as np

    from models.lowbit import GGUFLinear
    from models.z_image.handler import HANDLER
    from tests.test_offload import profiled_and_plain

    path = write_gguf(tmp_path / "q8.gguf", comfy_sd(tiny_comfy_file), T.Q8_0)
    want, got, streamed = profiled_and_plain(lambda: HANDLER.load_model(
        base_model_type="z_image_tiny", model_filename=path, dtype=torch.bfloat16, VAE_dtype=torch.float32,
        model_dir=tiny_dir), profile_no)
    assert np.array_equal(got, want)
    gguf_tensors = [(k, p) for module, k, p, _, _ in streamed if isinstance(module, GGUFLinear)]
    assert gguf_tensors and {p.dtype for k, p in gguf_tensors if k == "weight_raw"} == {torch.uint8}
    assert not any(k == "weight" for k, _ in gguf_tensors)  # no dequantized weight travels
    held = sum(p.numel() * p.element_size() for _, k, p, _, _ in streamed)
    dense = sum(m.in_features * m.out_features * 2 for m in {id(m): m for m, *_ in streamed
                                                              if isinstance(m, GGUFLinear)}.values())
    assert held < 0.75 * dense  # Q8_0: 34 bytes per 32 weights against bf16's 64
