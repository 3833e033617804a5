"""NAG (Normalized Attention Guidance) against a direct, unfused evaluation of its formulas on the tiny model.

The reference below is written from the model description (zimage-facts.md) and the NAG formulas, in
float64, token by token where NAG decides; it shares no code with models/z_image/transformer.py or nag.py.
It keeps the image, caption and negative-caption hidden states as three tensors: in each main layer the
image tokens attend once over [image, caption] (positive RoPE positions) and once over [image, negative]
(the positions of a negative pass: image at axis-0 position L_neg + 1), the caption tokens take the
positive attention, the negative tokens the negative one.
"""

import copy
import math

import pytest
import torch

from models.z_image.handler import HANDLER
from models.z_image.nag import NagGuidance, nag_blend

F64 = torch.float64


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return HANDLER.load_model(base_model_type="z_image_tiny", dtype=torch.float32, model_dir=tiny_dir)[0]


@pytest.fixture(scope="module")
def model64(pipe):
    return copy.deepcopy(pipe.transformer).double()


# ---- the reference -------------------------------------------------------------------------------------

def lin(x, m):
    y = x @ m.weight.to(F64).T
    return y if m.bias is None else y + m.bias.to(F64)


def rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.to(F64)


def angles(ids, cfg):
    """RoPE angles (S, head_dim/2) for position ids (S, 3): per axis, position * theta^(-2j/d)."""
    parts = []
    for axis, d in enumerate(cfg.axes_dims):
        inv = cfg.rope_theta ** (-torch.arange(0, d, 2, dtype=F64) / d)
        parts.append(ids[:, axis:axis + 1].to(F64) * inv)
    return torch.cat(parts, -1)


def rotate(x, ang):
    """x (B, S, H, D): rotate the interleaved pairs (x0, x1), (x2, x3)... as complex numbers."""
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)[None, :, None]).flatten(-2)


def softmax_attention(q, k, v):
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).flatten(2)


def project(att, x, heads):
    b, s, _ = x.shape
    q = rms(lin(x, att.to_q).view(b, s, heads, -1), att.norm_q.weight, 1e-5)
    k = rms(lin(x, att.to_k).view(b, s, heads, -1), att.norm_k.weight, 1e-5)
    return q, k, lin(x, att.to_v).view(b, s, heads, -1)


def self_attention(att, x, ang, heads):
    q, k, v = project(att, x, heads)
    return softmax_attention(rotate(q, ang), rotate(k, ang), v)


def ffn(ff, x):
    a = lin(x, ff.w1)
    return lin(a * torch.sigmoid(a) * lin(x, ff.w3), ff.w2)


def nag_by_hand(zp, zn, s, tau, alpha, stats):
    """Per token: z = s zp - (s-1) zn; |z|_1 / |zp|_1 > tau -> z rescaled to tau |zp|_1; alpha z + (1-alpha) zp."""
    out = torch.empty_like(zp)
    for b in range(zp.shape[0]):
        for j in range(zp.shape[1]):
            p, n = zp[b, j], zn[b, j]
            z = s * p - (s - 1) * n
            ratio = float(z.abs().sum() / p.abs().sum())
            if ratio > tau:
                z = z * (tau * p.abs().sum() / z.abs().sum())
                stats["clamped"] += 1
            else:
                stats["kept"] += 1
            out[b, j] = alpha * z + (1 - alpha) * p
    return out


def pad_to_32(n):
    return n + (-n) % 32


def reference(model, x, t, caps, neg_caps=None, nag=(1.0, 3.5, 0.5), stats=None):
    cfg = model.config
    heads, eps, p = cfg.n_heads, cfg.norm_eps, 2
    b, c, h, w = x.shape
    ht, wt = h // p, w // p
    n_img = ht * wt
    x, t = x.to(F64), t.to(F64)

    # timestep: sinusoid of 1000 t, [cos, sin], max period 1e4, then the MLP
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=F64) / half)
    arg = (t * cfg.t_scale)[:, None] * freqs[None]
    mlp = model.t_embedder.mlp
    adaln = lin(torch.nn.functional.silu(lin(torch.cat([arg.cos(), arg.sin()], -1), mlp[0])), mlp[2])

    # image tokens: 2x2 patches, channel last inside the patch; pads -> x_pad_token
    patches = x.reshape(b, c, ht, p, wt, p).permute(0, 2, 4, 3, 5, 1).reshape(b, n_img, p * p * c)
    img = lin(patches, model.all_x_embedder["2-1"])
    n_img_pad = pad_to_32(n_img)
    img = torch.cat([img, model.x_pad_token.to(F64).expand(b, n_img_pad - n_img, -1)], 1)

    def embed(cs):
        length = pad_to_32(cs[0].shape[0])
        rows = []
        for cap in cs:
            e = lin(rms(cap.to(F64), model.cap_embedder[0].weight, eps), model.cap_embedder[1])
            rows.append(torch.cat([e, model.cap_pad_token.to(F64).expand(length - cap.shape[0], -1)]))
        return torch.stack(rows)

    def cap_ids(length):
        ids = torch.zeros(length, 3, dtype=torch.long)
        ids[:, 0] = torch.arange(1, length + 1)
        return ids

    def img_ids(cap_len):
        ids = torch.zeros(n_img_pad, 3, dtype=torch.long)
        for i in range(ht):
            for j in range(wt):
                ids[i * wt + j] = torch.tensor([cap_len + 1, i, j])
        return ids  # pads stay at (0, 0, 0)

    def modulated(blk, segments, attend):
        scale_a, gate_a, scale_f, gate_f = lin(adaln, blk.adaLN_modulation[0])[:, None].chunk(4, -1)
        normed = [rms(s, blk.attention_norm1.weight, eps) * (1 + scale_a) for s in segments]
        outs = attend(normed)
        segments = [s + gate_a.tanh() * rms(lin(o, blk.attention.to_out[0]), blk.attention_norm2.weight, eps)
                    for s, o in zip(segments, outs)]
        return [s + gate_f.tanh() * rms(ffn(blk.feed_forward, rms(s, blk.ffn_norm1.weight, eps) * (1 + scale_f)),
                                         blk.ffn_norm2.weight, eps) for s in segments]

    def context_refine(cap):
        ang = angles(cap_ids(cap.shape[1]), cfg)
        for blk in model.context_refiner:
            n = rms(cap, blk.attention_norm1.weight, eps)
            cap = cap + rms(lin(self_attention(blk.attention, n, ang, heads), blk.attention.to_out[0]),
                            blk.attention_norm2.weight, eps)
            cap = cap + rms(ffn(blk.feed_forward, rms(cap, blk.ffn_norm1.weight, eps)), blk.ffn_norm2.weight, eps)
        return cap

    cap = embed(caps)
    lc = cap.shape[1]
    ang_img = angles(img_ids(lc), cfg)
    for blk in model.noise_refiner:
        img = modulated(blk, [img], lambda s, blk=blk: [self_attention(blk.attention, s[0], ang_img, heads)])[0]
    cap = context_refine(cap)
    ang_pos = torch.cat([ang_img, angles(cap_ids(lc), cfg)])
    if neg_caps is None:
        for blk in model.layers:
            def attend(s, blk=blk):
                both = softmax_attention(*_rotated(blk, torch.cat(s, 1), ang_pos, heads))
                return [both[:, :n_img_pad], both[:, n_img_pad:]]

            img, cap = modulated(blk, [img, cap], attend)
    else:
        scale, tau, alpha = nag
        neg = context_refine(embed(neg_caps))
        ln = neg.shape[1]
        ang_neg = torch.cat([angles(img_ids(ln), cfg), angles(cap_ids(ln), cfg)])
        for blk in model.layers:
            def attend(s, blk=blk):
                i, cp, ng = s
                zp = softmax_attention(*_rotated(blk, torch.cat([i, cp], 1), ang_pos, heads))
                zn = softmax_attention(*_rotated(blk, torch.cat([i, ng], 1), ang_neg, heads))
                z_img = nag_by_hand(zp[:, :n_img_pad], zn[:, :n_img_pad], scale, tau, alpha, stats)
                return [z_img, zp[:, n_img_pad:], zn[:, n_img_pad:]]

            img, cap, neg = modulated(blk, [img, cap, neg], attend)

    final = model.all_final_layer["2-1"]
    y = torch.nn.functional.layer_norm(img[:, :n_img], (img.shape[-1],), eps=1e-6)
    y = lin(y * (1 + lin(torch.nn.functional.silu(adaln), final.adaLN_modulation[1])[:, None]), final.linear)
    return y.reshape(b, ht, wt, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


def _rotated(blk, seq, ang, heads):
    q, k, v = project(blk.attention, seq, heads)
    return rotate(q, ang), rotate(k, ang), v


# ---- tests ---------------------------------------------------------------------------------------------

def inputs(cap_lens, neg_lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 6, 10, generator=g, dtype=F64)  # 3 x 5 tokens, 17 image pads
    t = torch.tensor([0.25, 0.6], dtype=F64)
    caps = [torch.randn(n, 32, generator=g, dtype=F64) for n in cap_lens]
    negs = [torch.randn(n, 32, generator=g, dtype=F64) for n in neg_lens]
    return x, t, caps, negs


def test_reference_without_nag_is_the_model(model64):
    """The reference is right where there is something to compare it with: the plain model."""
    x, t, caps, _ = inputs([20, 25], [])
    # the model's RoPE tables and rotation are float32: a tolerance well above that, far below NAG's effect
    torch.testing.assert_close(model64(x, t, caps), reference(model64, x, t, caps), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("neg_lens", [[27, 30], [45, 40], [5, 12]], ids=["same-padded", "longer", "shorter"])
def test_transformer_nag_matches_hand_written_reference(model64, neg_lens):
    x, t, caps, negs = inputs([20, 25], neg_lens)
    scale, tau, alpha = 4.0, 3.5, 0.6
    stats = {"clamped": 0, "kept": 0}
    ref = reference(model64, x, t, caps, negs, (scale, tau, alpha), stats)
    ours = model64(x, t, caps, nag=NagGuidance(negs, scale, tau, alpha))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert stats["clamped"] > 0 and stats["kept"] > 0, stats  # both sides of tau were exercised
    plain = model64(x, t, caps)
    assert (ours - plain).abs().max() > 1e-2 * plain.abs().max()  # NAG did change the output


def test_nag_blend_by_hand():
    g = torch.Generator().manual_seed(3)
    zp = torch.randn(2, 40, 24, generator=g, dtype=F64)
    zn = zp + 0.5 * torch.randn(2, 40, 24, generator=g, dtype=F64) * torch.linspace(0, 2, 40, dtype=F64)[:, None]
    stats = {"clamped": 0, "kept": 0}
    want = nag_by_hand(zp, zn, 3.0, 2.5, 0.5, stats)
    assert stats["clamped"] > 0 and stats["kept"] > 0
    torch.testing.assert_close(nag_blend(zp, zn, 3.0, 2.5, 0.5), want, rtol=1e-6, atol=1e-6)  # float32 inside
    assert nag_blend(zp.float(), zn.float(), 3.0, 2.5, 0.5).dtype == torch.float32
    # at scale 1 the guided vector is z_pos itself: the blend gives z_pos back
    torch.testing.assert_close(nag_blend(zp, zn, 1.0, 2.5, 0.3), zp, rtol=1e-6, atol=1e-6)

def test_nag_through_compiled_blocks():
    """Regionally compiled blocks take the NAG argument (a traced variant of their own) and match eager."""
    from torch._dynamo.utils import counters

    from models.z_image.tiny import TINY_TRANSFORMER
    from models.z_image.transformer import ZImageConfig, ZImageTransformer, compile_blocks

    torch.manual_seed(0)
    model = ZImageTransformer(ZImageConfig.from_dict(TINY_TRANSFORMER)).eval()
    x, t = torch.randn(1, 16, 8, 8), torch.rand(1)
    cap, negs = torch.randn(7, 32), {n: torch.randn(n, 32) for n in (9, 40)}
    with torch.no_grad():
        eager = {n: model(x, t, [cap], nag=NagGuidance([c], 3.0)) for n, c in negs.items()}
        plain = model(x, t, [cap])
        torch._dynamo.reset()
        counters.clear()
        compile_blocks(model, backend="aot_eager")
        for n, c in negs.items():
            torch.testing.assert_close(model(x, t, [cap], nag=NagGuidance([c], 3.0)), eager[n], rtol=1e-5, atol=1e-5)
        graphs = counters["stats"]["unique_graphs"]
        model(x, t, [cap], nag=NagGuidance([negs[9]], 2.0, 2.0, 0.3))  # other NAG values
        assert counters["stats"]["unique_graphs"] == graphs
        torch.testing.assert_close(model(x, t, [cap]), plain, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


KW = dict(prompt="a lighthouse", height=64, width=64, num_inference_steps=3, flow_shift=3.0, seed=5,
          output_type="latent")


def test_nag_scale_one_is_bit_identical_and_encodes_no_negative(pipe):
    pipe.text_encoder.cache.clear()
    before = pipe.text_encoder.encode_calls
    plain = pipe(guidance_scale=0.0, **KW).images
    off = pipe(guidance_scale=0.0, negative_prompt="fog", nag_scale=1.0, nag_tau=2.0, nag_alpha=0.9, **KW).images
    assert torch.equal(plain, off)
    assert pipe.text_encoder.encode_calls == before + 1  # the positive only


class Calls:
    """Records the transformer calls of a pipeline run (captions and the NAG argument)."""

    def __init__(self, pipe):
        self.pipe, self.orig, self.calls = pipe, pipe.transformer.forward, []

    def __enter__(self):
        def forward(x, t, caps, **kw):
            self.calls.append((caps, kw.get("nag")))
            return self.orig(x, t, caps, **kw)

        self.pipe.transformer.forward = forward
        return self

    def __exit__(self, *exc):
        del self.pipe.transformer.forward


def test_pipeline_nag_at_guidance_zero(pipe):
    pos, neg = pipe.encode_prompt("a lighthouse"), pipe.encode_prompt("fog, haze")
    with Calls(pipe) as rec:
        a = pipe(guidance_scale=0.0, negative_prompt="fog, haze", nag_scale=3.0, nag_tau=2.5, nag_alpha=0.25,
                 num_images_per_prompt=2, **KW).images
    assert len(rec.calls) == KW["num_inference_steps"]  # no second forward pass
    for caps, nag in rec.calls:
        assert len(caps) == 2 and all(torch.equal(c, pos) for c in caps)
        assert (nag.scale, nag.tau, nag.alpha) == (3.0, 2.5, 0.25)
        assert len(nag.neg_caps) == 2 and all(torch.equal(c, neg) for c in nag.neg_caps)
    plain = pipe(guidance_scale=0.0, num_images_per_prompt=2, **KW).images
    other = pipe(guidance_scale=0.0, negative_prompt="a storm", nag_scale=3.0, nag_tau=2.5, nag_alpha=0.25,
                 num_images_per_prompt=2, **KW).images
    assert (a - plain).abs().max() > 1e-2 and (a - other).abs().max() > 1e-2


def test_pipeline_nag_with_cfg_guides_the_positive_pass_only(pipe):
    pos, neg = pipe.encode_prompt("a lighthouse"), pipe.encode_prompt("fog")
    with Calls(pipe) as rec:
        pipe(guidance_scale=2.0, negative_prompt="fog", nag_scale=2.0, **KW)
    assert len(rec.calls) == 2 * KW["num_inference_steps"]  # NAG's positive pass runs apart from the negative
    for caps, nag in rec.calls:
        if nag is not None:
            assert torch.equal(caps[0], pos) and torch.equal(nag.neg_caps[0], neg)
        else:
            assert torch.equal(caps[0], neg)
    assert sum(nag is not None for _, nag in rec.calls) == KW["num_inference_steps"]


@pytest.mark.parametrize("bad", [dict(nag_scale=0.5), dict(nag_scale=2.0, nag_tau=0.0),
                                 dict(nag_scale=2.0, nag_alpha=1.5)])
def test_bad_nag_values_refused(pipe, bad):
    with pytest.raises(ValueError, match="nag_"):
        pipe(guidance_scale=0.0, **bad, **KW)
