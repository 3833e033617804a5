"""TwinFlow Turbo: the transformer's target-time path, UCGM's unified sampler, and the TwinFlow file layouts.

References are written out here from the published formulas (TwinFlow's diffusers_patch and README configs,
Wan2GP's unified_sampler.py / pipeline_z_image.py), not taken from our code.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from models.errors import UserError
from models.z_image import quantize as q
from models.z_image import samplers as zs
from models.z_image.handler import HANDLER, TRANSFORMER_STEMS
from tests.conftest import to_comfy

TWINFLOW_BF16 = "TwinFlow-Z-Image-Turbo_bf16.safetensors"
TWINFLOW_INT8 = "TwinFlow-Z-Image-Turbo_quanto_bf16_int8.safetensors"


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return HANDLER.load_model(base_model_type="z_image_tiny", dtype=torch.float32, model_dir=tiny_dir)[0]


# ---------------------------------------------------------------- the target-time path

def hand_embedding(embedder, v: torch.Tensor) -> torch.Tensor:
    """The timestep embedder written out: [cos, sin](v * 10000^(-k/128)), k < 128, then Linear-SiLU-Linear.
    The sinusoid's argument is a float32 product, as diffusers and Wan2GP specify it (arguments reach 1000 rad);
    the rest runs in float64."""
    k = torch.arange(128, dtype=torch.float32)
    args = (v.float()[:, None] * torch.exp(-math.log(10000.0) * k / 128)[None]).double()
    feats = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    w1, b1 = embedder.mlp[0].weight.double(), embedder.mlp[0].bias.double()
    w2, b2 = embedder.mlp[2].weight.double(), embedder.mlp[2].bias.double()
    return F.silu(feats @ w1.T + b1) @ w2.T + b2


def hand_time_embedding(model, t: torch.Tensor, target: torch.Tensor, second) -> torch.Tensor:
    """t_emb + E((target - t) * 1000) * |t - target| (TwinFlow's Z-Image wrapper; E = its t_embedder_2)."""
    return (hand_embedding(model.t_embedder, t * 1000)
            + hand_embedding(second, (target - t) * 1000) * (t.double() - target.double()).abs()[:, None])


def forward_with_adaln(model, adaln: torch.Tensor, *args) -> torch.Tensor:
    """The model's forward with its time embedding replaced by adaln."""
    orig = model.time_embedding
    model.time_embedding = lambda t, target=None: adaln.to(torch.float32)
    try:
        return model(*args)
    finally:
        model.time_embedding = orig


def inputs(pipe):
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    cap = pipe.encode_prompt("a fox")
    return x, [cap, cap]


@pytest.mark.parametrize("aux", [False, True], ids=["wan2gp_shared_embedder", "t_embedder_2"])
def test_target_time_path_against_its_formula(pipe, aux):
    import copy

    model = copy.deepcopy(pipe.transformer)
    if aux:  # TwinFlow's own model: a second embedder, trained apart (here: perturbed)
        model.add_target_embedder()
        with torch.no_grad():
            for p in model.t_embedder_2.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    second = model.t_embedder_2 if aux else model.t_embedder
    t = torch.tensor([0.001, 0.4])  # TwinFlow's 2-step times (sigma 0.999, 0.6)
    for target in (torch.tensor([0.0, 0.0]), torch.tensor([0.4, 0.9]), torch.tensor([1.0, 0.2])):
        want = hand_time_embedding(model, t, target, second)
        got = model.time_embedding(t, target)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        # and the whole forward runs on that embedding
        x, caps = inputs(pipe)
        torch.testing.assert_close(model(x, t, caps, target=target), forward_with_adaln(model, want, x, t, caps),
                                   rtol=1e-4, atol=1e-4)
    assert model.has_target_embedder == aux
    assert ("t_embedder_2" in model.fp32_input_modules) == aux


def test_target_unset_is_the_plain_model_bit_for_bit(pipe):
    import copy

    model = pipe.transformer
    x, caps = inputs(pipe)
    t = torch.tensor([0.3, 0.7])
    plain = model(x, t, caps)
    assert torch.equal(model(x, t, caps, target=None), plain)
    assert torch.equal(model.time_embedding(t), model.t_embedder(t * 1000))
    assert model.fp32_input_modules == ("", "t_embedder")
    with_aux = copy.deepcopy(model)
    with_aux.add_target_embedder()
    assert torch.equal(with_aux(x, t, caps), plain)  # an unused t_embedder_2 changes nothing
    # a target equal to t adds a zero term ("mul" style)
    assert torch.equal(model(x, t, caps, target=t.clone()), plain)


# ---------------------------------------------------------------- the unified sampler

def test_unified_schedules_and_presets():
    """TwinFlow's README configs: 2 NFE gaps (0.001, 0.6), 4 NFE (0.001, 0.5); Wan2GP's: more steps, (0.001, 0)."""
    def lin(a, b, n):
        return torch.linspace(a, b, n, dtype=torch.float64).float()

    assert torch.equal(zs.unified_sigmas(2), torch.cat([1 - lin(0.001, 0.4, 2), torch.zeros(1)]))
    assert torch.equal(zs.unified_sigmas(1), torch.tensor([1 - np.float32(0.001), 0.0]))
    assert torch.equal(zs.unified_sigmas(4), torch.cat([1 - lin(0.001, 0.5, 4), torch.zeros(1)]))
    assert torch.equal(zs.unified_sigmas(8), torch.cat([1 - lin(0.001, 1.0, 9)[:-1], torch.zeros(1)]))
    assert [zs.unified_config(n).style for n in (1, 2, 3, 4, 5, 8)] == ["few", "few", "any", "any", "mul", "mul"]
    assert zs.unified_config(2) == zs.UnifiedConfig("few", (0.001, 0.6), 1.0, 0.0, (1.0, 1.0, 1.0))
    assert zs.unified_config(4).gap == (0.001, 0.5) and zs.unified_config(4).stochast_ratio == 1.0
    # Kumaraswamy time warp (a, b, c)
    u = lin(0.001, 0.5, 3)
    warped = zs.unified_sigmas(3, zs.UnifiedConfig("any", (0.001, 0.5), time_dist_ctrl=(1.17, 0.8, 1.1)))
    torch.testing.assert_close(warped[:-1], 1 - (1 - (1 - u**1.17) ** 0.8) ** 1.1)
    with pytest.raises(ValueError, match="style"):
        zs.UnifiedConfig("fast")
    assert zs.model_evaluations("twinflow", 4) == 4
    with pytest.raises(ValueError, match="unified_step"):
        zs.sample_step("twinflow", torch.zeros(1), 0, zs.unified_sigmas(2), lambda x, k: x)


class Spy:
    """Records every transformer call's times and targets."""

    def __init__(self, pipe):
        self.pipe, self.orig, self.calls = pipe, pipe.transformer.forward, []

    def __enter__(self):
        def forward(x, t, caps, **kw):
            self.calls.append((t.clone(), None if kw.get("target") is None else kw["target"].clone()))
            return self.orig(x, t, caps, **kw)

        self.pipe.transformer.forward = forward
        return self

    def __exit__(self, *exc):
        del self.pipe.transformer.forward


KW = dict(prompt="a lighthouse at dusk", height=64, width=64, guidance_scale=0.0, seed=21, output_type="latent")


def test_two_step_run_against_a_hand_written_ucgm_update(pipe):
    """2 steps, TwinFlow's preset: sigmas 0.999, 0.6, 0; target sigma 0 ("few"), which TwinFlow's time mapping
    sign(s) (1 - |s|) hands to the transformer as time 0; velocity F = -output; x_hat = x - s F, z_hat = x + (1 - s) F;
    x' = (1 - s') x_hat + s' (sqrt(1 - r) z_hat + sqrt(r) n) with r = 1 and n the image generator's next draw;
    the result is the last x_hat."""
    seen = []
    with Spy(pipe) as spy:
        out = pipe(num_inference_steps=2, sampler="twinflow", callback=lambda k, n, lat: seen.append(lat), **KW).images
    assert len(spy.calls) == 2 and len(seen) == 2
    for (t, target), want_t in zip(spy.calls, (1 - np.float32(0.999), 1 - np.float32(0.6))):
        assert float(t[0]) == pytest.approx(want_t, abs=1e-7) and torch.equal(target, torch.zeros(1))

    tr, cap = pipe.transformer, pipe.encode_prompt(KW["prompt"])
    gen = torch.Generator().manual_seed(KW["seed"])
    x = torch.randn((1, 16, 8, 8), generator=gen)
    s = torch.tensor([0.999, 0.6, 0.0])  # float32, as Wan2GP's schedule is (the tiny model is touchy about t)
    for k in range(2):
        vel = -tr(x, (1 - s[k]).reshape(1), [cap], target=torch.zeros(1)).double()
        x_hat = x.double() - float(s[k]) * vel
        if s[k + 1] == 0:
            x = x_hat
        else:
            fresh = torch.randn((1, 16, 8, 8), generator=gen).double()
            x = ((1 - float(s[k + 1])) * x_hat + float(s[k + 1]) * fresh).float()
        torch.testing.assert_close(seen[k].double(), x.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), x.double(), rtol=1e-5, atol=1e-5)


def wan2gp_style_loop(x, sigmas, style, r, e, model, noise):
    """UCGM-S's loop as Wan2GP writes it (order 1): per step the target sigma, x_hat / z_hat from the velocity,
    extrapolation from the third step on against the previous raw estimates, the re-noising mix; the result
    is the last step's raw x_hat."""
    x_hats, z_hats, final = [], [], None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        tgt = {"few": 0.0, "mul": s, "any": s_next}[style]
        vel = model(x, s, tgt)
        x_hat, z_hat = x - s * vel, x + (1 - s) * vel
        final = x_hat
        if e > 0:
            z_hats.append(z_hat)
            x_hats.append(x_hat)
            if i > 1:
                z_hat = z_hat + e * (z_hat - z_hats[-2])
                x_hat = x_hat + e * (x_hat - x_hats[-2])
                z_hats.pop(0)
                x_hats.pop(0)
        n = noise() if r > 0 and s_next > 0 else 0.0
        x = (1 - s_next) * x_hat + s_next * (z_hat * (1 - r) ** 0.5 + n * r**0.5)
    return final


@pytest.mark.parametrize("style,r,e", [("any", 0.0, 0.0), ("any", 0.3, 0.5), ("mul", 1.0, 0.0), ("few", 0.6, 0.2)])
def test_unified_step_against_the_reference_loop(style, r, e):
    """unified_step over 5 steps of a synthetic velocity field vs the loop above (targets, extrapolation,
    partial stochasticity)."""
    cfg = zs.UnifiedConfig(style, (0.001, 0.3), stochast_ratio=r, extrapol_ratio=e)
    sigmas = zs.unified_sigmas(5, cfg)
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2))

    def velocity(x, s, tgt):
        return torch.tanh(x) * (1 + s) - 0.4 * x * s**2 + math.sin(3 * s) + 0.7 * (s - tgt)

    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    want = wan2gp_style_loop(x0.double(), sigmas.double(), style, r, e, velocity,
                             lambda: torch.randn(x0.shape, generator=g1).double())
    x, state = x0.clone(), zs.UnifiedState()
    for i in range(5):
        s, s_next = sigmas[i], sigmas[i + 1]
        tgt = {"few": 0.0, "mul": float(s), "any": float(s_next)}[style]
        pred = -velocity(x, float(s), tgt)
        x = zs.unified_step(x, pred, s, s_next, cfg, lambda: torch.randn(x0.shape, generator=g2), state)
    torch.testing.assert_close(x.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(state.x_hat, x)


def test_twinflow_runs_per_step_targets_and_seed_streams(pipe):
    # 3-4 steps: "any" style, the target is the next sigma (the last one's 0)
    with Spy(pipe) as spy:
        a = pipe(num_inference_steps=4, sampler="twinflow", **KW).images
    sig = zs.unified_sigmas(4)
    assert len(spy.calls) == 4
    for k, (t, target) in enumerate(spy.calls):
        assert torch.equal(t, (1 - sig[k]).expand(1))
        assert torch.equal(target, (sig[k + 1].sign() * (1 - sig[k + 1])).expand(1))
    # deterministic; image i of a batch is the run of seed + i alone (its step noise continues its own stream)
    assert torch.equal(pipe(num_inference_steps=4, sampler="twinflow", **KW).images, a)
    both = pipe(num_inference_steps=2, sampler="twinflow", num_images_per_prompt=2, **KW).images
    alone = pipe(num_inference_steps=2, sampler="twinflow", **dict(KW, seed=KW["seed"] + 1)).images
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)
    # deterministic settings (r = 0) need no noise at all; the overrides reach the sampler
    d1 = pipe(num_inference_steps=2, sampler="twinflow", unified={"stochast_ratio": 0.0}, **KW).images
    assert not torch.equal(d1, pipe(num_inference_steps=2, sampler="twinflow", **KW).images)
    with pytest.raises(UserError, match="twinflow"):
        pipe(num_inference_steps=2, sampler="twinflow", image=Image.new("RGB", (64, 64)), strength=0.5, **KW)


# ---------------------------------------------------------------- file layouts

def twinflow_set(tiny_dbm_dir: Path, out: Path, sd: dict, name: str = TWINFLOW_BF16, cfg: str | None = None) -> Path:
    """The DeepBeepMeep set with a TwinFlow transformer instead of Base: Turbo's VAE, scheduler and Qwen3."""
    shutil.copytree(tiny_dbm_dir, out)
    (out / "ZImageBase_bf16.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in sd.items()}, out / name, metadata={"config": cfg} if cfg else None)
    return out


@pytest.fixture(scope="module")
def tiny_sd(tiny_dir):
    return load_file(tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def tiny_cfg(tiny_dir):
    return (tiny_dir / "transformer" / "config.json").read_text()


def load(model_dir, dtype=torch.float32, **kw):
    return HANDLER.load_model(base_model_type="z_image_twinflow_turbo", dtype=dtype, model_dir=model_dir, **kw)


TF_KW = dict(prompt="a red fox", height=64, width=64, num_inference_steps=2, guidance_scale=0.0, seed=5,
             sampler="twinflow", output_type="latent")


def test_twinflow_names_and_downloads(tmp_path):
    from models.registry import ModelDefinition

    assert "z_image_twinflow_turbo" in HANDLER.architectures
    assert TRANSFORMER_STEMS["z_image_twinflow_turbo"] == "TwinFlow-Z-Image-Turbo"
    assert HANDLER.ui_defaults("z_image_twinflow_turbo")["num_inference_steps"] == 2
    base = "https://huggingface.co/DeepBeepMeep/Z-Image/resolve/main/"
    urls = [base + TWINFLOW_BF16, base + TWINFLOW_INT8]
    te_urls = [base + "Qwen3/qwen3_bf16.safetensors", base + "Qwen3/qwen3_quanto_bf16_int8.safetensors"]
    d = ModelDefinition("z_image_twinflow_turbo", "z_image_twinflow_turbo", "TwinFlow", "", urls, te_urls, {},
                        tmp_path / "x")
    names = {s.repo_path for s in HANDLER.files_to_download(d, tmp_path, "int8", "bf16")}
    assert TWINFLOW_INT8 in names and TWINFLOW_BF16 not in names
    assert {"ZImageTurbo_VAE_bf16.safetensors", "ZImageTurbo_scheduler_config.json",
            "Qwen3/qwen3_bf16.safetensors"} <= names


def test_twinflow_bf16_file_as_wan2gp_publishes_it(tiny_dbm_dir, tiny_sd, tiny_cfg, pipe, tmp_path):
    """DeepBeepMeep's file: Turbo's diffusers key names, no extra tensor (Wan2GP's model has none): the target
    goes through t_embedder. Also without config metadata (the shapes give the architecture)."""
    folder = twinflow_set(tiny_dbm_dir, tmp_path / "set", tiny_sd)
    p, parts = load(folder)
    assert not parts["transformer"].has_target_embedder
    want = pipe(**TF_KW).images
    assert torch.equal(p(**TF_KW).images, want)
    with pytest.raises(UserError, match=TWINFLOW_BF16):
        load(tiny_dbm_dir)  # the Base set has no TwinFlow file


def test_twinflow_reference_keys_with_t_embedder_2(tiny_dbm_dir, tiny_sd, tiny_cfg, pipe, tmp_path):
    """inclusionAI's TwinFlow model has `t_embedder_2.*` (TwinFlow's target embedder, t_embedder's shapes): loaded
    and used for the target, in diffusers and in ComfyUI (`model.diffusion_model.`) naming."""
    aux = {"t_embedder_2." + k.removeprefix("t_embedder."): v.clone() for k, v in tiny_sd.items()
           if k.startswith("t_embedder.")}
    same = twinflow_set(tiny_dbm_dir, tmp_path / "same", {**tiny_sd, **aux}, cfg=tiny_cfg)
    p, parts = load(same)
    assert parts["transformer"].has_target_embedder
    assert torch.equal(p(**TF_KW).images, pipe(**TF_KW).images)  # a copy of t_embedder: Wan2GP's result
    moved = {k: v + 0.2 for k, v in aux.items()}
    comfy = to_comfy({**tiny_sd, **moved})
    assert "model.diffusion_model.t_embedder_2.mlp.0.weight" in comfy
    p2, parts2 = load(twinflow_set(tiny_dbm_dir, tmp_path / "comfy", comfy, cfg=tiny_cfg))
    assert parts2["transformer"].has_target_embedder
    torch.testing.assert_close(parts2["transformer"].t_embedder_2.mlp[0].weight, moved["t_embedder_2.mlp.0.weight"])
    assert not torch.allclose(p2(**TF_KW).images, pipe(**TF_KW).images)
    # the plain samplers never use it
    plain = dict(TF_KW, sampler="euler")
    assert torch.equal(p2(**plain).images, pipe(**plain).images)


@pytest.mark.parametrize("aux", [False, True], ids=["wan2gp_keys", "t_embedder_2"])
def test_twinflow_int8_file(tiny_dir, tiny_dbm_dir, tiny_sd, tmp_path, aux):
    """The quanto int8 file (mmgp's format, as --save-quantized writes it) under its published name."""
    from optimum.quanto import QModuleMixin

    parts = HANDLER.load_model(base_model_type="z_image_tiny", dtype=torch.bfloat16, model_dir=tiny_dir)[1]
    model = parts["transformer"]
    if aux:
        model.add_target_embedder()
    q.quantize_on_the_fly(model)
    out = tmp_path / "int8"
    shutil.copytree(tiny_dbm_dir, out)
    (out / "ZImageBase_bf16.safetensors").unlink()
    q.save_quantized(model, out / TWINFLOW_INT8)
    p, parts = load(out, transformer_quantization="int8", dtype=torch.bfloat16)
    tr = parts["transformer"]
    assert isinstance(tr.layers[0].attention.to_q, QModuleMixin)
    assert tr.has_target_embedder == aux
    assert not isinstance(tr.t_embedder.mlp[0], QModuleMixin)
    lat = p(**TF_KW).images
    assert lat.shape == (1, 16, 8, 8) and torch.isfinite(lat).all()
