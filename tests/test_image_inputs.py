"""Image inputs: img2img and inpainting against diffusers (tiny model, fp32, CPU), paste-back,
outpaint canvas, upscale sizes, VAE tiling, evaluation counts and bad input."""

import warnings

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImageImg2ImgPipeline, ZImageInpaintPipeline
from diffusers import ZImagePipeline as DiffusersPipeline
from diffusers.pipelines.z_image import pipeline_z_image_img2img, pipeline_z_image_inpaint
from PIL import Image, ImageFile, ImageFilter
from scipy import ndimage

from models import image_inputs as ii
from models.errors import UserError
from models.z_image.handler import HANDLER
from tests.conftest import DiffusersLatents, assert_latents_match, assert_pixels_match

W, H = 128, 96
SEED = 1234
CASES = {
    "base": dict(prompt="a red fox in the snow", negative_prompt="blurry, low quality", guidance=4.0, shift=6.0,
                 steps=6),
    "turbo": dict(prompt="a lighthouse at dusk", negative_prompt="", guidance=0.0, shift=3.0, steps=8),
}


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return HANDLER.load_model(base_model_type="z_image_tiny", dtype=torch.float32, model_dir=tiny_dir)[0]


@pytest.fixture(scope="module")
def components(tiny_dir):
    return DiffusersPipeline.from_pretrained(tiny_dir, dtype=torch.float32).components


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers' img2img / inpaint sample the posterior; our contract (and their ControlNet's) is its mean."""
    def mean(encoder_output, generator=None, sample_mode="sample"):
        return encoder_output.latent_dist.mode()

    monkeypatch.setattr(pipeline_z_image_img2img, "retrieve_latents", mean)
    monkeypatch.setattr(pipeline_z_image_inpaint, "retrieve_latents", mean)


def source_image(width=150, height=110) -> Image.Image:
    """A structured picture (gradients, a disc, stripes) of an odd size: the pipeline must resize it."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255 * x / width
    g = 255 * y / height
    b = 255 * ((np.hypot(x - width * 0.6, y - height * 0.4) < height * 0.3) | ((x // 9) % 2 == 0) * (y > height * 0.7))
    return Image.fromarray(np.stack([r, g, b], -1).round().astype(np.uint8))


def source_mask(width=64, height=48) -> Image.Image:
    """White rectangle (and a grey area above the threshold), black elsewhere, at a size other than the render's."""
    m = np.zeros((height, width), np.uint8)
    m[10:30, 20:50] = 255
    m[30:40, 20:50] = 140  # grey >= 0.5: repaint too
    m[40:44, 20:50] = 100  # grey < 0.5: keep
    return Image.fromarray(m)


def diffusers_run(components, cls, case, latents: DiffusersLatents | None = None, **kw):
    sched = FlowMatchEulerDiscreteScheduler.from_config(components["scheduler"].config, shift=case["shift"])
    ref = cls(**{**components, "scheduler": sched})
    ref.set_progress_bar_config(disable=True)
    out = ref(prompt=case["prompt"], negative_prompt=case["negative_prompt"], height=H, width=W,
              num_inference_steps=case["steps"], guidance_scale=case["guidance"],
              generator=torch.Generator("cpu").manual_seed(SEED), callback_on_step_end=latents, **kw)
    return np.asarray(out.images[0]).astype(np.int16)


def ours(pipe, case, latents: list | None = None, **kw):
    """Our image; latents (a list), when given, receives the final latents (the last step's, which are decoded)."""
    keep = None if latents is None else (lambda k, n, lat: latents.append(lat.clone()))
    out = pipe(prompt=case["prompt"], negative_prompt=case["negative_prompt"], height=H, width=W,
               num_inference_steps=case["steps"], guidance_scale=case["guidance"], flow_shift=case["shift"],
               seed=SEED, callback=keep, **kw)
    return np.asarray(out.images[0]).astype(np.int16)


def test_encode_matches_diffusers(pipe, components):
    """An image's latents against diffusers' own preprocessing (VaeImageProcessor) and VAE: measured 6e-7 apart;
    an image read as x / 256 instead of x / 255 is 8e-4 off, which sampling with noise partly hides."""
    from diffusers.image_processor import VaeImageProcessor

    img = ii.fit_image(source_image(), W, H)
    vae = components["vae"]
    x = VaeImageProcessor(vae_scale_factor=16).preprocess(img, height=H, width=W)
    with torch.no_grad():
        want = (vae.encode(x).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
    assert_latents_match(pipe.encode_image(img), want, atol=2e-5)


@pytest.mark.parametrize("strength", [0.5, 0.8])
@pytest.mark.parametrize("name", list(CASES))
def test_img2img_matches_diffusers(pipe, components, posterior_mean, name, strength):
    case = CASES[name]
    src = source_image()
    lat, ref_lat = [], DiffusersLatents()
    mine = ours(pipe, case, latents=lat, image=src, strength=strength)
    # diffusers resizes with its own processor: give it the image at the render size (our Lanczos resize)
    ref = diffusers_run(components, ZImageImg2ImgPipeline, case, latents=ref_lat, image=ii.fit_image(src, W, H),
                        strength=strength)
    assert mine.shape == ref.shape == (H, W, 3)
    assert mine.std() > 10
    assert_latents_match(lat[-1], ref_lat.latents)
    assert_pixels_match(mine, ref)
    t2i = ours(pipe, case)
    assert np.abs(mine - t2i).max() > 10, "the image changed nothing"


@pytest.mark.parametrize("strength", [1.0, 0.7])
@pytest.mark.parametrize("name", list(CASES))
def test_inpaint_matches_diffusers(pipe, components, posterior_mean, name, strength):
    case = CASES[name]
    src, mask = source_image(), source_mask()
    lat, ref_lat = [], DiffusersLatents()
    mine = ours(pipe, case, latents=lat, image=src, mask_image=mask, strength=strength)
    binary = Image.fromarray(ii.mask_to_array(mask, W, H).astype(np.uint8) * 255)
    ref = diffusers_run(components, ZImageInpaintPipeline, case, latents=ref_lat, image=ii.fit_image(src, W, H),
                        mask_image=binary, strength=strength)
    assert_latents_match(lat[-1], ref_lat.latents)
    assert_pixels_match(mine, ref)
    t2i = ours(pipe, case)
    assert np.abs(mine - t2i).max() > 10
    # in latent space the kept area is exactly the image's latents (the last step blends with them clean)
    lat = pipe(prompt=case["prompt"], negative_prompt=case["negative_prompt"], height=H, width=W,
               num_inference_steps=case["steps"], guidance_scale=case["guidance"], flow_shift=case["shift"],
               seed=SEED, image=src, mask_image=mask, strength=strength, output_type="latent").images
    keep = pipe._latent_mask(mask, H, W) == 0
    image_latents = pipe.encode_image(ii.fit_image(src, W, H))
    assert keep.any() and (~keep).any()
    assert torch.equal(lat[keep.expand_as(lat)], image_latents[keep.expand_as(lat)])
    assert not torch.allclose(lat[~keep.expand_as(lat)], image_latents[~keep.expand_as(lat)], atol=1e-2)


def test_strength_one_is_text_to_image(pipe):
    case = CASES["turbo"]
    kw = dict(output_type="latent")
    a = pipe(prompt=case["prompt"], num_inference_steps=4, guidance_scale=0.0, seed=7, height=H, width=W, **kw).images
    b = pipe(prompt=case["prompt"], num_inference_steps=4, guidance_scale=0.0, seed=7, height=H, width=W,
             image=source_image(), strength=1.0, **kw).images
    assert torch.equal(a, b)


def test_batch_noise_per_seed(pipe):
    """Image i of an img2img batch equals a single run with seed + i."""
    kw = dict(prompt="x", num_inference_steps=4, guidance_scale=0.0, height=64, width=64, image=source_image(),
              strength=0.6, output_type="latent")
    both = pipe(seed=3, num_images_per_prompt=2, **kw).images
    second = pipe(seed=4, **kw).images
    assert torch.allclose(both[1:], second, atol=1e-5)


class Counter:
    def __init__(self, pipe, monkeypatch):
        self.calls = self.passes = 0
        forward = pipe.transformer.forward

        def counted(x, t, caps, *a, **k):
            self.calls += 1
            self.passes += x.shape[0]
            return forward(x, t, caps, *a, **k)

        monkeypatch.setattr(pipe.transformer, "forward", counted)


@pytest.mark.parametrize("steps,strength,expected", [(8, 0.5, 4), (8, 1.0, 8), (6, 0.8, 5), (4, 0.3, 2)])
def test_evaluation_counts(pipe, monkeypatch, steps, strength, expected):
    """img2img runs ~N*S steps (int(N - N*S) skipped); CFG doubles each one, as in text-to-image."""
    assert steps - ii.start_index(steps, strength) == expected
    counter = Counter(pipe, monkeypatch)
    kw = dict(prompt="abc", num_inference_steps=steps, seed=1, height=64, width=64, output_type="latent")
    pipe(guidance_scale=0.0, **kw)  # text-to-image: N evaluations
    assert (counter.calls, counter.passes) == (steps, steps)
    counter.calls = counter.passes = 0
    seen = []
    pipe(guidance_scale=0.0, image=source_image(), strength=strength, callback=lambda k, n, lat: seen.append((k, n)),
         **kw)
    assert (counter.calls, counter.passes) == (expected, expected)
    assert seen == [(k, expected) for k in range(expected)]  # progress counts the steps that run
    counter.calls = counter.passes = 0
    # CFG with a negative of another padded length: two forward calls per step
    pipe(guidance_scale=3.0, negative_prompt="a negative prompt long enough to pad to 64 tokens",
         image=source_image(), mask_image=source_mask(), strength=strength, **kw)
    assert (counter.calls, counter.passes) == (2 * expected, 2 * expected)


def test_paste_back_exact_outside_the_fade():
    rng = np.random.default_rng(0)
    orig = rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)
    gen = rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)
    mask = np.zeros((80, 100), bool)
    mask[20:45, 30:60] = True
    mask[60, 10] = True  # a lone pixel: its fade is a small blob
    out = np.asarray(ii.paste_back(Image.fromarray(orig), Image.fromarray(gen), mask))
    ys, xs = np.nonzero(mask)
    yy, xx = np.mgrid[0:80, 0:100]
    dist = np.sqrt(((yy[..., None] - ys) ** 2 + (xx[..., None] - xs) ** 2).min(-1))
    far = dist >= 12
    assert np.array_equal(out[far], orig[far])  # 12 px or more from the mask: the input's own pixels
    assert np.array_equal(out[mask], gen[mask])  # the repainted area is untouched
    fade = (dist > 0) & (dist < 4)
    assert (out[fade] != orig[fade]).any() and (out[fade] != gen[fade]).any()  # feathered, not cut
    hard = np.asarray(ii.paste_back(Image.fromarray(orig), Image.fromarray(gen), mask, mask_blur=0))
    assert np.array_equal(hard, np.where(mask[..., None], gen, orig))


def feather_reference(mask: np.ndarray, r: int) -> np.ndarray:
    """feather_mask as its docstring defines it, in float64 with scipy: square dilation by r px, then a
    Gaussian of sigma r / 2 cut at r px (edges replicated), never below the mask itself."""
    m = mask.astype(np.float64)
    grown = ndimage.maximum_filter(m, size=2 * r + 1, mode="constant", cval=0.0)
    blurred = ndimage.gaussian_filter(grown, sigma=r / 2, mode="nearest", truncate=2.0)  # radius 2 sigma = r
    return np.clip(np.maximum(blurred, m), 0.0, 1.0)


@pytest.mark.parametrize("r", [1, 2, 4, 7])
def test_feather_and_paste_back_match_a_reference(r):
    rng = np.random.default_rng(r)
    mask = np.zeros((70, 90), bool)
    mask[20:45, 30:60] = True
    mask[0:6, 70:90] = True  # touching the border: its weight stays there
    mask[55, 12] = True  # a lone pixel
    want = feather_reference(mask, r)
    alpha = ii.feather_mask(mask, r)
    assert alpha.dtype == np.float32 and np.abs(alpha - want).max() < 1e-5
    orig = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    gen = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    out = np.asarray(ii.paste_back(Image.fromarray(orig), Image.fromarray(gen), mask, mask_blur=r)).astype(int)
    a = want[..., None]
    mixed = np.rint(orig + (gen.astype(np.float64) - orig) * a)  # rounded to the nearest level
    diff = np.abs(out - np.where(a > 0, mixed, orig))
    fade = np.broadcast_to((a > 0) & (a < 1), diff.shape)
    assert fade.sum() > 100
    # float32 against float64: a value exactly between two levels may round either way, no more
    assert diff.max() <= 1 and (diff[fade] > 0).mean() < 0.01


def test_paste_back_resizes_original_and_mask():
    """original and mask at other sizes are brought to the output's as the pipeline did (Lanczos, nearest)."""
    src = source_image()
    gen = Image.new("RGB", (W, H), (0, 0, 0))
    out = np.asarray(ii.paste_back(src, gen, source_mask(), mask_blur=2))
    resized = np.asarray(ii.fit_image(src, W, H))
    far = ~ii.feather_mask(ii.mask_to_array(source_mask(), W, H), 2).astype(bool)
    assert far.sum() > W * H / 2 and np.array_equal(out[far], resized[far])
    assert (out[ii.mask_to_array(source_mask(), W, H)] == 0).all()


def test_mask_threshold_and_resize():
    m = ii.mask_to_array(source_mask(), 128, 96)  # 2x nearest
    assert m.shape == (96, 128)
    assert m[20:60, 40:100].all() and m[60:80, 40:100].all()  # white and grey 140
    assert not m[80:88, 40:100].any() and not m[:20].any()  # grey 100 and black
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:4, 2:4] = 255  # white opaque strokes on a transparent layer: the alpha is the mask
    assert ii.mask_gray(Image.fromarray(rgba, "RGBA")).getpixel((2, 2)) == 255
    assert ii.mask_to_array(Image.fromarray(rgba, "RGBA"), 8, 8).sum() == 4


def test_outpaint_canvas():
    src = source_image(96, 64)
    canvas, mask = ii.outpaint_canvas(src, (32, 16, 0, 48))
    assert canvas.size == mask.size == (96 + 32, 64 + 16 + 48)
    c, m = np.asarray(canvas), np.asarray(mask)
    assert np.array_equal(c[16:80, 32:128], np.asarray(src))  # the old area, pixel for pixel
    assert (m[16:80, 32:128] == 0).all() and (m[:16] == 255).all() and (m[80:] == 255).all()
    assert (m[:, :32] == 255).all()
    assert (m == 255).sum() == 128 * 128 - 96 * 64
    # the new area continues the border's colours (blurred: stripes average out; no black frame)
    border = np.asarray(src)[-1].astype(float)
    assert np.abs(c[80:84, 32:128].mean((0, 1)) - border.mean(0)).max() < 20
    assert np.abs(c[80:84, 32:128].astype(float) - border).mean(0).min() < 20
    assert ii.outpaint_canvas(src, "16,0,16,0")[0].size == (128, 64)
    for bad in ((10, 0, 0, 0), (0, -16, 0, 0), (0, 0, 0, 0)):
        with pytest.raises(UserError, match="margin"):
            ii.outpaint_canvas(src, bad)
    with pytest.raises(UserError, match="LEFT,TOP,RIGHT,BOTTOM"):
        ii.parse_margins("16,16")
    with pytest.raises(UserError, match="4096"):
        ii.outpaint_canvas(src, (4096, 0, 0, 0))


@pytest.mark.parametrize("margins", [(32, 16, 0, 48), (0, 0, 16, 0), (0, 288, 16, 0)])
def test_outpaint_fill_is_a_blurred_stretch_of_the_border(margins):
    """The new area per outpaint_canvas' docstring: edge pixels replicated outward (here by index clamping), a
    Gaussian blur of radius max margin / 4 within 4..64 (here 12, 4 and 64) over the whole stretched picture."""
    src = source_image(96, 64)
    left, top, right, bottom = margins
    a = np.asarray(src)
    rows = np.clip(np.arange(-top, 64 + bottom), 0, 63)
    cols = np.clip(np.arange(-left, 96 + right), 0, 95)
    stretched = a[rows][:, cols]
    radius = min(max(max(margins) // 4, 4), 64)
    blurred = np.asarray(Image.fromarray(stretched).filter(ImageFilter.GaussianBlur(radius)))
    canvas, mask = ii.outpaint_canvas(src, margins)
    new = np.asarray(mask) == 255
    c = np.asarray(canvas)
    assert np.array_equal(c[new], blurred[new])
    assert np.array_equal(c[~new], a.reshape(-1, 3))
    assert not np.array_equal(blurred[new], stretched[new])  # the blur matters here (the stripes)


def test_upscale_size():
    assert ii.upscale_size(1000, 750, 1.5) == (1488, 1120)  # rounded down to multiples of 16
    assert ii.upscale_size(1024, 1024, 4) == (4096, 4096)
    assert ii.upscale_size(1000, 1000, 1.2) == (1200, 1200)
    for factor in (1, 0.5, 4.5, "x"):
        with pytest.raises(UserError, match="factor"):
            ii.upscale_size(512, 512, factor)
    with pytest.raises(UserError, match="exceeds 4096"):
        ii.upscale_size(1100, 1000, 4)
    src = source_image(150, 110)
    up = ii.upscale_image(src, 2)
    assert up.size == (288, 208)
    assert np.array_equal(np.asarray(up), np.asarray(src.resize((288, 208), Image.Resampling.LANCZOS)))
    assert not np.array_equal(np.asarray(up), np.asarray(src.resize((288, 208), Image.Resampling.BICUBIC)))


def test_vae_tiling_decision_and_tiled_encode(pipe, monkeypatch):
    assert not ii.vae_tiling_needed(2048, 2048)
    assert ii.vae_tiling_needed(2064, 2048)
    assert ii.vae_tiling_needed(4096, 4096)
    assert not ii.vae_tiling_needed(1024, 1024)
    assert ii.vae_tiling_needed(300, 300, max_pixels=256 * 256)
    img = ii.fit_image(source_image(), 256, 256)
    vae = pipe.vae
    saved = vae.tile_sample_min_size, vae.tile_latent_min_size
    vae.tile_sample_min_size, vae.tile_latent_min_size = 128, 16  # several tiles at 256 px
    try:
        full = pipe.encode_image(img)
        tiled = pipe.encode_image(img, tiled=True)
        assert not vae.use_tiling
        assert tiled.shape == full.shape == (1, 16, 32, 32)
        assert not torch.equal(tiled, full)  # it did tile
        # the tiny random VAE's group norms see per-tile statistics: close, not equal (about 20% of the spread)
        assert (tiled - full).abs().mean() < 0.3 * full.std()
        a, b = (np.asarray(pipe.decode(z)[0]).astype(int) for z in (full, tiled))
        assert np.abs(a - b).mean() < 20  # the bound test_pipeline uses for the tiled decode
        c = np.asarray(pipe.decode(full, tiled=True)[0]).astype(int)
        assert not np.array_equal(c, a) and np.abs(c - a).mean() < 20  # the decode tiled too
        # the pipeline asks the pixel-count rule for the encode and the decode
        used = []
        monkeypatch.setattr(ii, "vae_tiling_needed", lambda w, h, **_: used.append((w, h)) or True)
        enc, dec = pipe.encode_image, pipe.decode
        monkeypatch.setattr(pipe, "encode_image", lambda im, tiled=False: used.append(("enc", tiled)) or enc(im, tiled))
        monkeypatch.setattr(pipe, "decode", lambda lat, tiled=False: used.append(("dec", tiled)) or dec(lat, tiled))
        pipe(prompt="x", num_inference_steps=2, guidance_scale=0.0, seed=1, height=256, width=256, image=img,
             strength=0.5)
        assert ("enc", True) in used and ("dec", True) in used
    finally:
        vae.tile_sample_min_size, vae.tile_latent_min_size = saved


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="image file not found"):
        ii.load_image(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(UserError, match="not an image"):
        ii.load_image(tmp_path / "notes.txt")
    good = tmp_path / "good.png"
    source_image().save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:200])  # truncated
    with pytest.raises(UserError, match="corrupt") as e:
        ii.load_image(tmp_path / "cut.png")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="not a file"):
        ii.load_image(tmp_path)
    with pytest.raises(UserError, match="mask file not found"):
        ii.load_mask(tmp_path / "nomask.png")
    assert ii.load_image(good).size == (150, 110)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(rgba)
    assert ii.load_image(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparency on white


def test_bad_pipeline_inputs(pipe):
    kw = dict(prompt="x", num_inference_steps=2, guidance_scale=0.0, seed=1, height=64, width=64)
    with pytest.raises(UserError, match="mask needs an input image"):
        pipe(mask_image=source_mask(), **kw)
    for s in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(UserError, match="strength must be above 0 and at most 1"):
            pipe(image=source_image(), strength=s, **kw)
    with pytest.raises(UserError, match="nothing to repaint"):
        pipe(image=source_image(), mask_image=Image.new("L", (64, 64), 0), **kw)
    thin = np.zeros((64, 64), np.uint8)
    thin[:, 3] = 255  # one pixel wide, between the latent grid's samples
    with pytest.raises(UserError, match="too thin"):
        pipe(image=source_image(), mask_image=Image.fromarray(thin), **kw)
    with pytest.raises(UserError, match="image file not found"):
        pipe(image="/nonexistent/picture.png", strength=0.5, **kw)
    with pytest.raises(UserError, match="too low"):
        pipe(image=source_image(), strength=1e-18, **kw)


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path, monkeypatch):
    """A few-KB PNG declaring 12000 x 12000 px (144 MP: under Pillow's own refusal at 179 MP, which only
    warns) is refused before anything is decoded, with one message and no Pillow warning."""
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)
    assert bomb.stat().st_size < 100_000
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for read in (ii.load_image, ii.load_mask, ii.image_size, ii.native_size):
            with pytest.raises(UserError, match=r"'bomb.png' is too large: at most 16384 px a side and 64 "
                                                r"megapixels \(it is 12000x12000\)"):
                read(bomb)
    assert not decoded and not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]


@pytest.mark.parametrize("size,ok", [((16384, 16), True), ((16385, 16), False),
                                     ((8192, 8192), True), ((8192, 8193), False)])
def test_the_input_size_limit(tmp_path, size, ok):
    path = tmp_path / "big.png"
    Image.new("1", size).save(path)
    if ok:
        assert ii.image_size(path) == size
    else:
        with pytest.raises(UserError, match="too large"):
            ii.image_size(path)


def test_messages_name_the_file_not_its_folder_and_escape_control_characters(tmp_path):
    """An upload lives under /tmp/gradio/<hash>/, and a name can hold a NUL or an escape sequence: messages
    that reach the page carry the name only, escaped."""
    for name in ("gone\x00.png", "gone\x1b[31m.png", "gone\u202e.png"):
        with pytest.raises(UserError) as e:
            ii.load_image(tmp_path / name)
        text = str(e.value)
        assert str(tmp_path) not in text and text.isprintable() and text.isascii(), text
    (tmp_path / "zero\x07.png").write_bytes(b"")
    with pytest.raises(UserError) as e:
        ii.load_mask(tmp_path / "zero\x07.png")
    assert str(e.value) == "mask file 'zero\\x07.png' is not an image PIL can read"


def test_an_unreadable_file_is_named_without_its_folder(tmp_path, monkeypatch):
    """An OSError's own text names the path ("Permission denied: '/tmp/gradio/...'"): the message keeps its
    reason only."""
    locked = tmp_path / "locked.png"
    Image.new("RGB", (8, 8)).save(locked)

    def denied(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", denied)
    with pytest.raises(UserError) as e:
        ii.load_image(locked)
    assert str(e.value) == "image file 'locked.png' is corrupt or unreadable (Permission denied)"
