"""Our S3-DiT against diffusers' ZImageTransformer2DModel with the same weights."""

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from safetensors.torch import load_file

from models.z_image.checkpoints import convert_transformer_keys
from models.z_image.transformer import ZImageConfig, ZImageTransformer, pad_len
from tests.conftest import to_comfy


@pytest.fixture(scope="module")
def pair(tiny_dir):
    ref = ZImageTransformer2DModel.from_pretrained(tiny_dir / "transformer", dtype=torch.float32).eval()
    ours = ZImageTransformer(ZImageConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(load_file(tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors"), strict=True)
    return ref, ours


def reference(ref, x, t, caps):
    out = ref(list(x.unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]
    return torch.stack(out).squeeze(2)


@pytest.mark.parametrize("hw,cap_lens", [
    ((8, 8), [7, 7]),          # 16 image tokens -> image pads; caption pads
    ((16, 12), [32, 32]),      # 48 image tokens; caption exactly 32
    ((10, 14), [40, 61]),      # different caption lengths, same padded length 64
    ((32, 32), [5]),           # 256 tokens, no image pad
])
def test_matches_diffusers(pair, hw, cap_lens):
    ref, ours = pair
    g = torch.Generator().manual_seed(sum(hw) + sum(cap_lens))
    b = len(cap_lens)
    x = torch.randn(b, 16, *hw, generator=g)
    t = torch.rand(b, generator=g)
    caps = [torch.randn(n, 32, generator=g) for n in cap_lens]
    with torch.no_grad():
        want = reference(ref, x, t, caps)
        got = ours(x, t, caps)
    assert want.abs().max() > 0.1  # a real signal, not a degenerate zero output
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def test_separate_sequences_equal_diffusers_unmasked(pair):
    """Prompt and negative with different padded lengths: run apart, each equals diffusers alone."""
    ref, ours = pair
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 8, 8, generator=g)
    t = torch.rand(1, generator=g)
    pos, neg = torch.randn(20, 32, generator=g), torch.randn(45, 32, generator=g)
    assert pad_len(20) != pad_len(45)
    with torch.no_grad():
        for cap in (pos, neg):
            assert torch.allclose(ours(x, t, [cap]), reference(ref, x, t, [cap]), atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="same length"):
            ours(x.repeat(2, 1, 1, 1), t.repeat(2), [pos, neg])


def test_bf16_close_to_fp32(pair):
    _, ours = pair
    g = torch.Generator().manual_seed(4)
    x, t, caps = torch.randn(1, 16, 8, 8, generator=g), torch.rand(1, generator=g), [torch.randn(9, 32, generator=g)]
    with torch.no_grad():
        full = ours(x, t, caps)
        half = ours.to(torch.bfloat16)(x.bfloat16(), t, caps).float()
        ours.float()
    assert half.dtype == torch.float32
    rel = (half - full).norm() / full.norm()
    assert rel < 0.05


def test_rope_tables_are_reused(pair):
    _, ours = pair
    tables = ours.rope.for_shape(32, 4, 4, torch.device("cpu"))
    assert ours.rope.for_shape(32, 4, 4, torch.device("cpu")) is tables


def test_comfy_keys_convert(tiny_dir):
    sd = load_file(tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    comfy = to_comfy(sd)
    assert "model.diffusion_model.layers.0.attention.qkv.weight" in comfy
    back = convert_transformer_keys(comfy)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_key_conversion_units():
    q, k, v = torch.full((4, 2), 1.0), torch.full((4, 2), 2.0), torch.full((4, 2), 3.0)
    out = convert_transformer_keys({
        "model.diffusion_model.layers.3.attention.qkv.weight": torch.cat([q, k, v]),
        "model.diffusion_model.layers.3.attention.out.weight": torch.zeros(1),
        "model.diffusion_model.layers.3.attention.q_norm.weight": torch.zeros(1),
        "model.diffusion_model.layers.3.attention.k_norm.weight": torch.zeros(1),
        "model.diffusion_model.x_embedder.weight": torch.zeros(1),
        "model.diffusion_model.final_layer.adaLN_modulation.1.bias": torch.zeros(1),
        "model.diffusion_model.norm_final.weight": torch.zeros(1),
        "cap_embedder.1.weight": torch.zeros(1),  # already diffusers: unchanged
    })
    assert sorted(out) == sorted([
        "layers.3.attention.to_q.weight", "layers.3.attention.to_k.weight", "layers.3.attention.to_v.weight",
        "layers.3.attention.to_out.0.weight", "layers.3.attention.norm_q.weight", "layers.3.attention.norm_k.weight",
        "all_x_embedder.2-1.weight", "all_final_layer.2-1.adaLN_modulation.1.bias", "cap_embedder.1.weight",
    ])
    assert torch.equal(out["layers.3.attention.to_q.weight"], q)
    assert torch.equal(out["layers.3.attention.to_k.weight"], k)
    assert torch.equal(out["layers.3.attention.to_v.weight"], v)


def test_rope_rotates_pairs_by_the_position_angles():
    """apply_rope with RopeTables' full-width tables against a float64 complex rotation computed here:
    pair j of axis a turns by pos_a * theta^(-2j/d_a)."""
    from models.z_image.transformer import RopeTables, apply_rope

    theta, dims, lens = 256.0, [8, 4, 4], [64, 16, 16]
    ids = torch.tensor([[3, 0, 0], [1, 5, 9], [0, 15, 2], [63, 7, 1]])
    cos, sin = RopeTables(theta, dims, lens).lookup(ids)
    x = torch.randn(1, len(ids), 2, sum(dims), generator=torch.Generator().manual_seed(0))
    angles = torch.cat([ids[:, a:a + 1].double() * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
                        for a, d in enumerate(dims)], dim=-1)  # (S, D/2)
    xc = torch.view_as_complex(x.double().reshape(1, len(ids), 2, -1, 2).contiguous())
    want = torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)[None, :, None]).flatten(-2)
    got = apply_rope(x, cos, sin)
    assert got.dtype == x.dtype and torch.allclose(got.double(), want, atol=1e-5, rtol=0)
    # the same arithmetic per element as the (re*c - im*s, re*s + im*c) form it replaced: bit for bit
    half_c, half_s = cos[..., 0::2].unsqueeze(2), sin[..., 1::2].unsqueeze(2)
    re, im = x[..., 0::2], x[..., 1::2]
    pairs = torch.stack((re * half_c - im * half_s, re * half_s + im * half_c), dim=-1).flatten(-2)
    assert torch.equal(got, pairs)
