"""ControlNet Union (1.0, 2.0, 2.1) against diffusers' ZImageControlNetModel and its pipelines (tiny
random models, fp32, CPU); strength 0 is text-to-image; single-file and folder loading."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    ZImageControlNetInpaintPipeline,
    ZImageControlNetModel,
    ZImageControlNetPipeline,
    ZImageTransformer2DModel,
)
from diffusers import ZImagePipeline as DiffusersPipeline
from PIL import Image
from safetensors.torch import save_file

from models import image_inputs as ii
from models.errors import UserError
from models.z_image import controlnet as zc
from models.z_image.handler import HANDLER
from models.z_image.tiny import TINY_TRANSFORMER, _randomize
from models.z_image.transformer import ZImageConfig, ZImageTransformer
from tests.conftest import DiffusersLatents, assert_latents_match, assert_pixels_match

W, H = 128, 96
SEED = 1234
CASES = {
    "base": dict(prompt="a red fox in the snow", negative_prompt="blurry, low quality", guidance=4.0, shift=6.0,
                 steps=4),
    "turbo": dict(prompt="a lighthouse at dusk", negative_prompt="", guidance=0.0, shift=3.0, steps=5),
}


def net_config(version: str, places: list[int], refiner_places: list[int], n_refiner: int) -> dict:
    """A tiny ControlNet config of a published version's kind (dim/heads of TINY_TRANSFORMER)."""
    mode = {"1.0": None, "2.0": zc.REFINER_IS_CONTROL_LAYERS, "2.1": zc.REFINER_IS_OWN}[version]
    return dict(control_layers_places=places, control_refiner_layers_places=None if mode is None else refiner_places,
                control_in_dim=16 if mode is None else 33, add_control_noise_refiner=mode, all_patch_size=[2],
                all_f_patch_size=[1], dim=TINY_TRANSFORMER["dim"], n_refiner_layers=n_refiner,
                n_heads=TINY_TRANSFORMER["n_heads"], n_kv_heads=TINY_TRANSFORMER["n_kv_heads"], norm_eps=1e-5,
                qk_norm=True)


def random_net(cfg: dict, seed: int) -> zc.ZImageControlNet:
    net = zc.ZImageControlNet(zc.ControlNetConfig.from_dict(cfg))
    _randomize(net, torch.Generator().manual_seed(seed), 1.0)  # before/after_proj non-zero: hints matter
    return net.eval()


def diffusers_net(cfg: dict, sd: dict, transformer) -> ZImageControlNetModel:
    kw = {**cfg, "all_patch_size": tuple(cfg["all_patch_size"]), "all_f_patch_size": tuple(cfg["all_f_patch_size"])}
    ref = ZImageControlNetModel(**kw)
    ref.load_state_dict(sd, strict=True)
    return ZImageControlNetModel.from_transformer(ref.eval(), transformer)


# ---------------------------------------------------------------- model parity


@pytest.fixture(scope="module")
def transformers():
    cfg = ZImageConfig.from_dict({**TINY_TRANSFORMER, "n_layers": 6, "n_refiner_layers": 2})
    ours = ZImageTransformer(cfg)
    _randomize(ours, torch.Generator().manual_seed(5), 1.0)
    ref = ZImageTransformer2DModel(**{k: v for k, v in cfg.to_dict().items() if k != "_class_name"})
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours.eval(), ref.eval()


class Recording(zc.ControlInput):
    """Keeps the hints of the last forward pass."""

    def apply(self, *args):
        seq, self.last = super().apply(*args)
        return seq, self.last


def model_inputs(hw, cap_len, in_dim, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, *hw, generator=g)
    t = torch.rand(1, generator=g)
    cap = torch.randn(cap_len, TINY_TRANSFORMER["cap_feat_dim"], generator=g)
    return x, t, cap, torch.randn(1, in_dim, *hw, generator=g)


def frames(x):
    """Our (B, C, H, W) batch as diffusers' list of (C, 1, H, W)."""
    return list(x.unsqueeze(2).unbind(0))


@pytest.mark.parametrize("hw,cap_len", [((8, 8), 7), ((10, 14), 40)])
@pytest.mark.parametrize("version", ["1.0", "2.0", "2.1"])
def test_model_matches_diffusers(transformers, version, hw, cap_len):
    ours_t, ref_t = transformers
    cfg = net_config(version, [0, 2, 5], [0, 1], 2)
    net = random_net(cfg, seed=11)
    ref = diffusers_net(cfg, net.state_dict(), ref_t)
    x, t, cap, ctrl = model_inputs(hw, cap_len, cfg["control_in_dim"], sum(hw) + cap_len)
    scale = 0.7
    with torch.no_grad():
        want_hints = ref(frames(x), t, [cap], frames(ctrl), conditioning_scale=scale)
        want = torch.stack(ref_t(frames(x), t, [cap], controlnet_block_samples=want_hints,
                                 return_dict=False)[0]).squeeze(2)
        control = Recording(net, ctrl, torch.tensor(scale), main_refiner_hints=False)
        got = ours_t(x, t, [cap], control=control)
        plain = ours_t(x, t, [cap])
    assert sorted(control.last) == sorted(want_hints) == [0, 2, 5]
    for place, hint in want_hints.items():
        assert control.last[place].shape == hint.shape
        assert (control.last[place] - hint).abs().max() <= 1e-5 * max(1.0, hint.abs().max().item())
    assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
    assert (got - plain).abs().max() > 1e-2, "the ControlNet changed nothing"


@pytest.mark.parametrize("version", ["1.0", "2.0", "2.1"])
def test_model_publisher_refiner_hints(transformers, version):
    """main_refiner_hints (the default): the main stream starts from the image tokens refined with the refiner
    hints, as in VideoX-Fun's model. Reference: diffusers, its transformer's refined tokens replaced by the
    hinted ones its ControlNet computed (1.0 has no refiner hints: the same as diffusers)."""
    ours_t, ref_t = transformers
    cfg = net_config(version, [0, 2, 5], [0, 1], 2)
    net = random_net(cfg, seed=12)
    ref = diffusers_net(cfg, net.state_dict(), ref_t)
    hw = (10, 14)
    x, t, cap, ctrl = model_inputs(hw, 20, cfg["control_in_dim"], 4)
    n_img = 64  # 35 image tokens padded to 64
    seen = {}  # the x of control block 0's last call: the main pass (2.0 calls it in the refiner pass too)
    grab = ref.control_layers[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[1]))
    with torch.no_grad():
        hints = ref(frames(x), t, [cap], frames(ctrl), conditioning_scale=0.8)
        grab.remove()
        swap = ref_t.noise_refiner[-1].register_forward_hook(lambda m, args, out: seen["x"][:, :n_img])
        try:
            want = torch.stack(ref_t(frames(x), t, [cap], controlnet_block_samples=hints,
                                     return_dict=False)[0]).squeeze(2)
        finally:
            swap.remove()
        diffusers_like = torch.stack(ref_t(frames(x), t, [cap], controlnet_block_samples=hints,
                                           return_dict=False)[0]).squeeze(2)
        got = ours_t(x, t, [cap], control=zc.ControlInput(net, ctrl, torch.tensor(0.8)))
    assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
    if version == "1.0":
        assert torch.equal(want, diffusers_like)
    else:
        assert (want - diffusers_like).abs().max() > 1e-2, "the refiner hints changed nothing"


def test_strength_tensor_scales_hints(transformers):
    ours_t, _ = transformers
    net = random_net(net_config("2.1", [0, 3], [1], 2), seed=3)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 16, 8, 8, generator=g), torch.rand(1, generator=g)
    cap, ctrl = torch.randn(9, 32, generator=g), torch.randn(1, 33, 8, 8, generator=g)
    with torch.no_grad():
        plain = ours_t(x, t, [cap])
        for main_refiner_hints in (True, False):
            zero = ours_t(x, t, [cap], control=zc.ControlInput(net, ctrl, torch.tensor(0.0), main_refiner_hints))
            assert torch.equal(zero, plain)  # hints times a zero tensor add (signed) zeros: no change at all
            half = ours_t(x, t, [cap], control=zc.ControlInput(net, ctrl, torch.tensor(0.5), main_refiner_hints))
            assert (half - plain).abs().max() > 1e-3


# ---------------------------------------------------------------- sampling parity


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return HANDLER.load_model(base_model_type="z_image_tiny", dtype=torch.float32, model_dir=tiny_dir)[0]


@pytest.fixture(scope="module")
def components(tiny_dir):
    return DiffusersPipeline.from_pretrained(tiny_dir, dtype=torch.float32).components


@pytest.fixture(scope="module")
def folders(pipe, tmp_path_factory):
    """Tiny ControlNets for the tiny model as diffusers folders (config.json + safetensors), per version."""
    out = {}
    n_ref = pipe.transformer.config.n_refiner_layers
    for i, version in enumerate(["1.0", "2.0", "2.1"]):
        cfg = net_config(version, [0, 1], [0], n_ref)
        net = random_net(cfg, seed=20 + i)
        folder = tmp_path_factory.mktemp(f"cn{version}")
        save_file({k: v.contiguous() for k, v in net.state_dict().items()},
                  folder / "diffusion_pytorch_model.safetensors")
        (folder / "config.json").write_text(json.dumps({**cfg, "_class_name": "ZImageControlNetModel"}))
        out[version] = (folder, cfg, net.state_dict())
    return out


def control_picture(width=150, height=110) -> Image.Image:
    """Edges-like control picture (lines on black) of an odd size."""
    y, x = np.mgrid[0:height, 0:width]
    v = (((x + y) % 23 < 3) | (np.hypot(x - width * 0.4, y - height * 0.5) // 1 == height // 4)) * 255
    return Image.fromarray(np.stack([v, v, v], -1).astype(np.uint8))


def source_image(width=150, height=110) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    return Image.fromarray(np.stack([255 * x / width, 255 * y / height, 128 + 0 * x], -1).round().astype(np.uint8))


def source_mask(width=64, height=48) -> Image.Image:
    m = np.zeros((height, width), np.uint8)
    m[10:34, 16:50] = 255
    return Image.fromarray(m)


def ours(pipe, case, control=None, latents: list | None = None):
    """Our image; latents (a list), when given, receives the final latents (the last step's, which are decoded)."""
    keep = None if latents is None else (lambda k, n, lat: latents.append(lat.clone()))
    out = pipe(prompt=case["prompt"], negative_prompt=case["negative_prompt"], height=H, width=W,
               num_inference_steps=case["steps"], guidance_scale=case["guidance"], flow_shift=case["shift"],
               seed=SEED, control=control, callback=keep)
    return np.asarray(out.images[0]).astype(np.int16)


def diffusers_run(components, folders, version, cls, case, latents: DiffusersLatents | None = None, **kw):
    folder, cfg, sd = folders[version]
    net = diffusers_net(cfg, sd, components["transformer"])
    sched = FlowMatchEulerDiscreteScheduler.from_config(components["scheduler"].config, shift=case["shift"])
    ref = cls(**{**components, "scheduler": sched, "controlnet": net})
    ref.set_progress_bar_config(disable=True)
    out = ref(prompt=case["prompt"], negative_prompt=case["negative_prompt"], height=H, width=W,
              num_inference_steps=case["steps"], guidance_scale=case["guidance"],
              generator=torch.Generator("cpu").manual_seed(SEED), callback_on_step_end=latents, **kw)
    return np.asarray(out.images[0]).astype(np.int16)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("version", ["1.0", "2.1"])
def test_sampling_matches_diffusers(pipe, components, folders, version, name):
    case = CASES[name]
    net = zc.load_controlnet(folders[version][0], pipe.transformer.config, dtype=torch.float32)
    ctrl = control_picture()
    lat, ref_lat = [], DiffusersLatents()
    mine = ours(pipe, case, zc.control_input(pipe, net, ctrl, 0.75, W, H, main_refiner_hints=False), latents=lat)
    ref = diffusers_run(components, folders, version, ZImageControlNetPipeline, case, latents=ref_lat,
                        control_image=ii.fit_image(ctrl, W, H), controlnet_conditioning_scale=0.75)
    assert mine.shape == ref.shape == (H, W, 3)
    assert mine.std() > 10
    assert_latents_match(lat[-1], ref_lat.latents)
    assert_pixels_match(mine, ref)
    assert np.abs(mine - ours(pipe, case)).max() > 10, "the control changed nothing"


@pytest.mark.parametrize("version", ["2.0", "2.1"])
def test_inpaint_matches_diffusers(pipe, components, folders, version):
    case = CASES["turbo"]
    net = zc.load_controlnet(folders[version][0], pipe.transformer.config, dtype=torch.float32)
    ctrl, src, mask = control_picture(), source_image(), source_mask()
    lat, ref_lat = [], DiffusersLatents()
    mine = ours(pipe, case, zc.control_input(pipe, net, ctrl, 0.8, W, H, image=src, mask_image=mask,
                                             main_refiner_hints=False), latents=lat)
    binary = Image.fromarray(ii.mask_to_array(mask, W, H).astype(np.uint8) * 255)
    ref = diffusers_run(components, folders, version, ZImageControlNetInpaintPipeline, case, latents=ref_lat,
                        control_image=ii.fit_image(ctrl, W, H), image=ii.fit_image(src, W, H), mask_image=binary,
                        controlnet_conditioning_scale=0.8)
    assert_latents_match(lat[-1], ref_lat.latents)
    assert_pixels_match(mine, ref)
    plain = ours(pipe, case, zc.control_input(pipe, net, ctrl, 0.8, W, H, main_refiner_hints=False))
    assert np.abs(mine - plain).max() > 10, "the inpaint channels changed nothing"
    publisher = ours(pipe, case, zc.control_input(pipe, net, ctrl, 0.8, W, H, image=src, mask_image=mask))
    assert np.abs(publisher - mine).max() > 10, "the main stream's refiner hints changed nothing"


def test_inpaint_needs_v2(pipe, folders):
    net = zc.load_controlnet(folders["1.0"][0], pipe.transformer.config, dtype=torch.float32)
    with pytest.raises(UserError, match="no inpaint channels"):
        zc.control_input(pipe, net, control_picture(), 0.8, W, H, image=source_image(), mask_image=source_mask())


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_strength_zero_is_text_to_image(pipe, folders, version):
    net = zc.load_controlnet(folders[version][0], pipe.transformer.config, dtype=torch.float32)
    for case in CASES.values():
        control = zc.control_input(pipe, net, control_picture(), 0.0, W, H)
        assert control is None  # the ControlNet does not run at all
        assert np.array_equal(ours(pipe, case, control), ours(pipe, case))


# ---------------------------------------------------------------- single files


def original_file(path, version: str, n_layers: int = 30) -> dict:
    """A ControlNet single file with the published key names and layer counts (1.0: 6 control layers of
    30, 2.x: 15), tiny width. 2.0 files carry a control_noise_refiner with zero before_proj ("2.0-bare":
    none at all)."""
    places = list(range(0, n_layers, 5 if version == "1.0" else 2))
    cfg = net_config("1.0" if version == "1.0" else "2.1", places, [0, 1], 2)
    sd = random_net(cfg, seed=7).state_dict()
    if version == "2.0":
        sd["control_noise_refiner.0.before_proj.weight"].zero_()
        sd["control_noise_refiner.0.before_proj.bias"].zero_()
    elif version == "2.0-bare":
        sd = {k: v for k, v in sd.items() if not k.startswith("control_noise_refiner.")}
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return sd


@pytest.mark.parametrize("version", ["1.0", "2.0", "2.0-bare", "2.1"])
def test_single_file_versions(tmp_path, version):
    tcfg = ZImageConfig.from_dict({**TINY_TRANSFORMER, "n_layers": 30, "n_refiner_layers": 2})
    path = tmp_path / f"Z-Image-Turbo-Fun-Controlnet-Union-{version}.safetensors"
    sd = original_file(path, version)
    net = zc.load_controlnet(path, tcfg, dtype=torch.float32)
    assert net.config.version == version.removesuffix("-bare")
    assert net.config.control_layers_places == (list(range(0, 30, 5)) if version == "1.0" else list(range(0, 30, 2)))
    assert net.in_dim == (16 if version == "1.0" else 33)
    got = net.state_dict()
    for k, v in got.items():
        assert torch.equal(v, sd[k]), k
    if version.startswith("2.0"):  # its unused refiner tensors are dropped, as diffusers does
        assert not any(k.startswith("control_noise_refiner.") for k in got)
    # the loaded 2.x ControlNet runs with the transformer it was read for
    model = ZImageTransformer(tcfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        out = model(torch.randn(1, 16, 8, 8, generator=g), torch.rand(1, generator=g), [torch.randn(5, 32)],
                    control=zc.ControlInput(net, torch.randn(1, net.in_dim, 8, 8), torch.tensor(1.0)))
    assert torch.isfinite(out).all()


def test_bad_files(tmp_path):
    tcfg = ZImageConfig.from_dict({**TINY_TRANSFORMER, "n_layers": 30, "n_refiner_layers": 2})
    path = tmp_path / "cn.safetensors"
    sd = original_file(path, "2.1")
    # a transformer file (or anything else) is no ControlNet
    other = tmp_path / "other.safetensors"
    save_file({"layers.0.attention.to_q.weight": torch.zeros(4, 4)}, other)
    with pytest.raises(UserError, match="not a Z-Image ControlNet"):
        zc.load_controlnet(other, tcfg)
    # missing and unexpected keys are named
    broken = {k: v for k, v in sd.items() if k != "control_layers.3.after_proj.weight"}
    broken["control_layers.3.extra.weight"] = torch.zeros(2)
    save_file({k: v.contiguous() for k, v in broken.items()}, path)
    with pytest.raises(UserError, match=r"version 2\.1.*1 missing keys \(first: control_layers\.3\.after_proj\.weight"
                                        r"\); 1 unexpected keys \(first: control_layers\.3\.extra\.weight\)"):
        zc.load_controlnet(path, tcfg)
    # a folder without its config
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        zc.load_controlnet(tmp_path / "folder", tcfg)


def test_wrong_transformer(pipe, tmp_path):
    path = tmp_path / "cn.safetensors"
    original_file(path, "1.0")
    tcfg = ZImageConfig.from_dict({**TINY_TRANSFORMER, "n_layers": 30, "n_refiner_layers": 2})
    net = zc.load_controlnet(path, tcfg, dtype=torch.float32)
    with pytest.raises(UserError, match="does not fit the transformer"):
        zc.control_input(pipe, net, control_picture(), 0.5, W, H)  # the tiny model has 2 layers


def test_batch_and_nag(pipe, folders):
    """One control for a batch (with CFG): image i is the single run of seed + i; NAG is refused."""
    net = zc.load_controlnet(folders["2.1"][0], pipe.transformer.config, dtype=torch.float32)
    case = CASES["base"]
    control = zc.control_input(pipe, net, control_picture(), 0.6, W, H)
    kw = dict(prompt=case["prompt"], negative_prompt=case["negative_prompt"], height=H, width=W,
              num_inference_steps=case["steps"], guidance_scale=case["guidance"], flow_shift=case["shift"],
              control=control)
    both = pipe(seed=SEED, num_images_per_prompt=2, **kw).images
    second = pipe(seed=SEED + 1, **kw).images[0]
    assert np.abs(np.asarray(both[1]).astype(np.int16) - np.asarray(second).astype(np.int16)).max() <= 1
    with pytest.raises(UserError, match="NAG"):
        pipe(seed=SEED, nag_scale=2.0, **{**kw, "guidance_scale": 0.0})


@pytest.mark.parametrize("version", ["1.0", "2.1"])
def test_bf16_runs_close_to_fp32(transformers, tmp_path, version):
    """A bf16 transformer with a ControlNet loaded in bf16 (control latents and strength cast on the way)."""
    ours_t, _ = transformers
    cfg = net_config(version, [0, 2, 5], [0, 1], 2)
    net = random_net(cfg, seed=13)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    net16 = zc.load_controlnet(tmp_path, ours_t.config, dtype=torch.bfloat16)
    assert net16.dtype == torch.bfloat16
    model16 = ZImageTransformer(ours_t.config).to(torch.bfloat16).eval()
    model16.load_state_dict(ours_t.state_dict())
    x, t, cap, ctrl = model_inputs((8, 8), 12, cfg["control_in_dim"], 9)
    with torch.no_grad():
        want = ours_t(x, t, [cap], control=zc.ControlInput(net, ctrl, torch.tensor(0.9)))
        got = model16(x.bfloat16(), t, [cap], control=zc.ControlInput(net16, ctrl, torch.tensor(0.9)))
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 0.05 * want.abs().max()


def test_a_2x_controlnet_s_refiner_pass_replaces_the_model_s(transformers):
    """With its refiner hints on the main stream (the default), a 2.x ControlNet's hinted noise-refiner pass is
    the one the main layers start from: the model's own pass, whose result would be dropped, is not run. The
    output is exactly the one of the forward that runs both."""
    ours_t, _ = transformers
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 16, 8, 8, generator=g), torch.rand(1, generator=g)
    cap, ctrl = torch.randn(9, 32, generator=g), torch.randn(1, 33, 8, 8, generator=g)

    class BothPasses(zc.ControlInput):  # the forward before the skip: the model refines, then the ControlNet
        @property
        def refines_image(self) -> bool:
            return False

    calls = []
    hook = ours_t.noise_refiner[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        for version in ("2.0", "2.1"):
            net = random_net(net_config(version, [0, 3], [1], 2), seed=4)
            with torch.no_grad():
                calls.clear()
                skipped = ours_t(x, t, [cap], control=zc.ControlInput(net, ctrl, torch.tensor(0.7)))
                assert len(calls) == 1  # the ControlNet's pass only
                calls.clear()
                both = ours_t(x, t, [cap], control=BothPasses(net, ctrl, torch.tensor(0.7)))
                assert len(calls) == 2
                assert torch.equal(skipped, both)
                plain_hints = zc.ControlInput(net, ctrl, torch.tensor(0.7), main_refiner_hints=False)
                assert not plain_hints.refines_image  # diffusers' way: the model's own pass is the main stream
        net1 = random_net(net_config("1.0", [0, 3], None, 2), seed=4)
        assert not zc.ControlInput(net1, torch.randn(1, 16, 8, 8), torch.tensor(0.7)).refines_image
    finally:
        hook.remove()
