"""Image inputs without torch: loading, resizing, masks, outpaint canvases, paste-back, upscale sizes.

Everything here works on PIL images and numpy arrays so the CLI, the page and the tests can prepare
and check inputs without loading a model. The pipeline (models/z_image/pipeline.py) calls the same
functions, so an input prepared here twice gives the same result (each step is idempotent).

Conventions: masks are white = repaint, black = keep; a grey pixel counts as white from 0.5 up
(value >= 128), as diffusers' mask processor binarizes. Sizes are (width, height) like PIL.
"""

from __future__ import annotations

import math
import re
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from models.errors import UserError

MULTIPLE = 16  # width and height of every render: 2 x the VAE factor 8 (the transformer's 2x2 patches)
MAX_SIDE = 4096  # the largest width / height the app renders
MAX_UPSCALE = 4.0
DEFAULT_MASK_BLUR = 4
# Above this many pixels the VAE encodes and decodes in tiles whatever the device: an untiled Flux
# VAE pass at 4 MP already needs several GB of activations; 2048 x 2048 itself stays untiled.
VAE_UNTILED_MAX_PIXELS = 2048 * 2048
# The largest input file opened (checked from its header, before decoding): 4 x MAX_SIDE a side, so an
# upscale-sized source still fits, and 64 MP (8192 x 8192; 256 MB as RGB), far below what a small
# "decompression bomb" file can declare.
MAX_INPUT_SIDE = 4 * MAX_SIDE
MAX_INPUT_PIXELS = 64 * 2**20

ImageLike = Image.Image | str | Path
MaskLike = Image.Image | np.ndarray | str | Path


# -- loading and checks


def file_name(path: str | Path) -> str:
    """How messages name an input file: its name only, quoted and escaped (an upload lives under
    /tmp/gradio/<hash>/, and a name may hold control characters a reply must not carry)."""
    return ascii(Path(path).name)


@contextmanager
def open_checked(path: str | Path, what: str = "image") -> Iterator[Image.Image]:
    """The file at path opened (not yet decoded) once its header says it is within MAX_INPUT_SIDE and
    MAX_INPUT_PIXELS; UserError (naming the file by `file_name`) when it is missing, not an image, too
    large, or when reading it in the with block finds it truncated or corrupt.

    The size is checked before decoding: a few-KB PNG can declare 12000 x 12000 px (gigabytes once
    decoded). Pillow's own warning (above 89 MP) is silenced: this limit is lower and says it in one line.
    """
    p = Path(path).expanduser()
    name = file_name(p)
    if not p.exists():
        raise UserError(f"{what} file not found: {name}")
    if not p.is_file():
        raise UserError(f"{what} path is not a file: {name}")
    too_large = (f"{what} file {name} is too large: at most {MAX_INPUT_SIDE} px a side and "
                 f"{MAX_INPUT_PIXELS // 2**20} megapixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(p)
        with im:
            w, h = im.size
            if max(w, h) > MAX_INPUT_SIDE or w * h > MAX_INPUT_PIXELS:
                raise UserError(f"{too_large} (it is {w}x{h})")
            yield im
    except UnidentifiedImageError:
        raise UserError(f"{what} file {name} is not an image PIL can read") from None
    except Image.DecompressionBombError:  # beyond Pillow's own limit, which is higher than ours
        raise UserError(too_large) from None
    except (OSError, ValueError, SyntaxError, struct.error, EOFError) as e:  # truncated or corrupt data
        raise UserError(f"{what} file {name} is corrupt or unreadable ({_one_line(e)})") from None


def load_image(path: str | Path, what: str = "image") -> Image.Image:
    """The file at path as an RGB image (EXIF orientation applied); UserError when it is not one (see
    `open_checked`). what names the input in the message ("image", "mask")."""
    with open_checked(path, what) as im:
        im.load()  # decode now: a truncated file fails here, not later in the pipeline
        # phone photos store their rotation in EXIF; apply it so the model sees what the user sees
        return _to_rgb(ImageOps.exif_transpose(im))


def image_size(path: str | Path, what: str = "image") -> tuple[int, int]:
    """(width, height) of an image file from its header alone (checked like `load_image`, not decoded)."""
    with open_checked(path, what) as im:
        return im.size


def _one_line(e: Exception) -> str:
    """The exception's message on one printable line, without the file's path (an OSError such as
    "Permission denied: '/tmp/gradio/...'" names it)."""
    text = e.strerror if isinstance(e, OSError) and e.filename and e.strerror else str(e)
    return " ".join("".join(c if c.isprintable() else "?" for c in text).split()) or type(e).__name__


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB; transparency is composited on white (a transparent PNG's hidden pixels are often black)."""
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


def as_image(image: ImageLike, what: str = "image") -> Image.Image:
    """A PIL image from a PIL image or a path (RGB)."""
    if isinstance(image, (str, Path)):
        return load_image(image, what)
    if not isinstance(image, Image.Image):
        raise UserError(f"{what} must be an image or an image file path (got {type(image).__name__})")
    return _to_rgb(image)


def check_strength(strength: float) -> float:
    """The denoising strength S, 0 < S <= 1 (1 = the input image is fully replaced by noise)."""
    try:
        s = float(strength)
    except (TypeError, ValueError):
        raise UserError(f"strength must be a number (got {strength!r})") from None
    if not (0.0 < s <= 1.0):  # also refuses NaN
        raise UserError(f"strength must be above 0 and at most 1 (got {strength})")
    return s


def check_image_inputs(image: object | None, mask: object | None, strength: float) -> float:
    """The checks every entry point makes: a mask needs an image; strength in (0, 1]. Returns strength."""
    if mask is not None and image is None:
        raise UserError("a mask needs an input image (the mask says which part of it to repaint)")
    return check_strength(strength)


def native_size(image: ImageLike) -> tuple[int, int]:
    """The render size an input suggests when none is given: its own size, scaled down to fit MAX_SIDE if
    larger (aspect kept), each side rounded down to a multiple of 16 (at least 16). A file is read by its header."""
    w, h = image_size(image) if isinstance(image, (str, Path)) else as_image(image).size
    scale = min(1.0, MAX_SIDE / max(w, h))
    return (max(MULTIPLE, int(w * scale) // MULTIPLE * MULTIPLE), max(MULTIPLE, int(h * scale) // MULTIPLE * MULTIPLE))


def start_index(steps: int, strength: float) -> int:
    """Index of the first sigma of the full N-step schedule that img2img runs (diffusers' get_timesteps).

    int(N - min(N * S, N)): N - start evaluations run, about N * S (rounded up).
    """
    return int(max(steps - min(steps * strength, steps), 0))


# -- resizing and masks


def fit_image(image: ImageLike, width: int, height: int) -> Image.Image:
    """The input image at width x height (Lanczos; stretched, not cropped: the caller picks the size)."""
    im = as_image(image)
    if im.size != (width, height):
        im = im.resize((width, height), Image.Resampling.LANCZOS)
    return im


def image_to_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1], the same arithmetic as diffusers' VaeImageProcessor (x / 255)."""
    return np.asarray(image.convert("RGB")).astype(np.float32) / 255.0


def mask_to_array(mask: MaskLike, width: int, height: int) -> np.ndarray:
    """The mask as (height, width) bool, True = repaint; any size is resized NEAREST, grey >= 0.5 is white.

    Nearest keeps hard edges (no new grey levels to threshold); the threshold is diffusers' binarize.
    An all-black mask is a UserError: nothing to repaint.
    """
    if isinstance(mask, (str, Path)):
        mask = load_mask(mask)
    if isinstance(mask, np.ndarray):
        arr = mask
        if arr.ndim == 3:  # RGB(A) array: its luminance, like PIL's "L"
            mask = Image.fromarray(_to_uint8(arr[..., :3])).convert("L")
        else:
            mask = Image.fromarray(_to_uint8(arr))
    if not isinstance(mask, Image.Image):
        raise UserError(f"mask must be an image, an array or an image file path (got {type(mask).__name__})")
    m = mask_gray(mask)
    if m.size != (width, height):
        m = m.resize((width, height), Image.Resampling.NEAREST)
    out = (np.asarray(m).astype(np.float32) / 255.0) >= 0.5
    if not out.any():
        raise UserError("the mask is all black: nothing to repaint (white marks the area to repaint)")
    return out


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """bool -> 0/255; floats in [0, 1] -> 0..255; integers kept."""
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        return (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def load_mask(path: str | Path) -> Image.Image:
    """A mask file as a greyscale image (see `mask_gray`); UserError when it is not an image (see `open_checked`)."""
    with open_checked(path, "mask") as im:
        im.load()
        return mask_gray(ImageOps.exif_transpose(im))


def mask_gray(im: Image.Image) -> Image.Image:
    """A mask image as "L". Its alpha, when it has one that is not fully opaque, is the mask (an editor's
    transparent layer with painted strokes: the hidden pixels' colour means nothing); else its luminance."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        alpha = im.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha
    return im.convert("L")


# -- paste-back


def feather_mask(mask: np.ndarray, mask_blur: int = DEFAULT_MASK_BLUR) -> np.ndarray:
    """Per-pixel weight of the generated image, float32 in [0, 1]: 1 inside the mask, fading to 0 outside.

    The mask is grown by mask_blur px (square), then blurred (Gaussian, sigma mask_blur / 2, kernel cut
    at mask_blur px). So the fade lies wholly outside the mask (the repainted area is never mixed with
    the old pixels) and ends 2 * mask_blur px out: farther pixels get weight exactly 0. For the default
    4 that is 8 px (any pixel 12 px or more away, in any direction, is untouched).
    """
    m = np.asarray(mask, dtype=bool)
    if mask_blur <= 0:
        return m.astype(np.float32)
    r = int(mask_blur)
    grown = _max_filter(m, r).astype(np.float32)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / (r / 2.0)) ** 2)
    k = (k / k.sum()).astype(np.float32)
    alpha = _blur(grown, k)
    return np.clip(np.maximum(alpha, m.astype(np.float32)), 0.0, 1.0)


def _max_filter(m: np.ndarray, r: int) -> np.ndarray:
    """Square dilation by r px (separable max over shifts)."""
    h, w = m.shape
    p = np.pad(m, ((r, r), (0, 0)))
    rows = np.zeros_like(m)
    for s in range(2 * r + 1):
        rows |= p[s:s + h]
    p = np.pad(rows, ((0, 0), (r, r)))
    out = np.zeros_like(m)
    for s in range(2 * r + 1):
        out |= p[:, s:s + w]
    return out


def _blur(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable convolution with the 1-D kernel k (edge-replicated borders: a mask touching the border
    keeps its weight there)."""
    h, w = a.shape
    r = len(k) // 2
    p = np.pad(a, ((r, r), (0, 0)), mode="edge")
    rows = np.zeros_like(a)
    for s in range(len(k)):
        rows += k[s] * p[s:s + h]
    p = np.pad(rows, ((0, 0), (r, r)), mode="edge")
    out = np.zeros_like(a)
    for s in range(len(k)):
        out += k[s] * p[:, s:s + w]
    return out


def paste_back(
    original: ImageLike, generated: Image.Image, mask: MaskLike, mask_blur: int = DEFAULT_MASK_BLUR
) -> Image.Image:
    """The generated image with the original's own pixels put back outside the mask, feathered.

    The model only keeps the unmasked area in latent space: after the VAE round trip those pixels drift
    a little (colour, fine detail). This restores them: weight from `feather_mask`; pixels where it is 0
    (2 * mask_blur px or more outside the mask) are exactly the original's. original and mask are
    brought to the generated image's size the way the pipeline brought them (Lanczos, nearest).
    """
    gen = generated.convert("RGB")
    w, h = gen.size
    orig = np.asarray(fit_image(original, w, h))
    alpha = feather_mask(mask_to_array(mask, w, h), mask_blur)[..., None]
    g = np.asarray(gen)
    o = orig.astype(np.float32)
    mixed = np.clip(np.rint(o + (g.astype(np.float32) - o) * alpha), 0, 255).astype(np.uint8)
    out = np.where(alpha > 0, mixed, orig)  # exact: not a float round trip outside the fade
    return Image.fromarray(out)


# -- outpainting


def parse_margins(text: str | tuple | list) -> tuple[int, int, int, int]:
    """"LEFT,TOP,RIGHT,BOTTOM" (pixels, multiples of 16, >= 0) -> a tuple; UserError otherwise."""
    if isinstance(text, str):
        parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    else:
        parts = list(text)
    if len(parts) != 4:
        raise UserError(f"outpaint margins must be LEFT,TOP,RIGHT,BOTTOM in pixels (got {text!r})")
    try:
        vals = tuple(int(str(p)) for p in parts)
    except ValueError:
        raise UserError(f"outpaint margins must be whole numbers of pixels (got {text!r})") from None
    return check_margins(vals)


def check_margins(margins: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    names = ("left", "top", "right", "bottom")
    for name, v in zip(names, margins):
        if v < 0 or v % MULTIPLE:
            raise UserError(f"outpaint {name} margin must be a non-negative multiple of {MULTIPLE} px (got {v})")
    if not any(margins):
        raise UserError("outpaint margins are all 0: nothing to extend")
    return tuple(int(v) for v in margins)  # type: ignore[return-value]


def outpaint_canvas(
    image: ImageLike, margins: tuple[int, int, int, int] | str, max_side: int = MAX_SIDE
) -> tuple[Image.Image, Image.Image]:
    """The image on a canvas grown by (left, top, right, bottom) px, and its mask (new area white, "L").

    The new area is filled with a blurred stretch of the border: edge pixels are replicated outward,
    the result is Gaussian-blurred (radius a quarter of the largest margin, 4-64 px) and only the new
    area takes it. Colours continue the picture without hard streaks, so the VAE sees a plausible
    border and at strength < 1 the model starts from matching colours (at strength 1 the masked area
    starts from pure noise and the fill only matters through the encoder's view of the seam).
    The old area is the input, pixel for pixel. The canvas is image size + margins: the caller renders
    at that size when it is a multiple of 16, else resizes.
    """
    im = as_image(image)
    left, top, right, bottom = parse_margins(margins) if isinstance(margins, str) else check_margins(margins)
    w, h = im.size
    cw, ch = w + left + right, h + top + bottom
    if cw > max_side or ch > max_side:
        raise UserError(f"outpaint canvas {cw}x{ch} exceeds {max_side} px a side")
    arr = np.asarray(im)
    stretched = np.pad(arr, ((top, bottom), (left, right), (0, 0)), mode="edge")
    radius = min(max(max(left, top, right, bottom) // 4, 4), 64)
    blurred = np.asarray(Image.fromarray(stretched).filter(ImageFilter.GaussianBlur(radius)))
    mask = np.ones((ch, cw), dtype=bool)
    mask[top:top + h, left:left + w] = False
    canvas = np.where(mask[..., None], blurred, stretched)  # stretched == the input in the old area
    return Image.fromarray(canvas), Image.fromarray(mask.astype(np.uint8) * 255, mode="L")


# -- upscaling and tiling


def upscale_size(width: int, height: int, factor: float, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(width, height) x factor, each rounded down to a multiple of 16; 1 < factor <= 4, result <= max_side."""
    try:
        f = float(factor)
    except (TypeError, ValueError):
        raise UserError(f"upscale factor must be a number (got {factor!r})") from None
    if not (1.0 < f <= MAX_UPSCALE):
        raise UserError(f"upscale factor must be above 1 and at most {MAX_UPSCALE:g} (got {factor})")
    # the small epsilon keeps 1000 x 1.2 = 1199.9999 from losing a whole step of 16
    w = math.floor(width * f + 1e-6) // MULTIPLE * MULTIPLE
    h = math.floor(height * f + 1e-6) // MULTIPLE * MULTIPLE
    if w > max_side or h > max_side:
        raise UserError(f"upscaled size {w}x{h} exceeds {max_side} px a side: use a smaller factor")
    if w < MULTIPLE or h < MULTIPLE:
        raise UserError(f"upscaled size {w}x{h} is below {MULTIPLE} px a side")
    return w, h


def upscale_image(image: ImageLike, factor: float, max_side: int = MAX_SIDE) -> Image.Image:
    """The image resized (Lanczos) by factor to `upscale_size`; the input for an img2img refine pass."""
    im = as_image(image)
    return im.resize(upscale_size(*im.size, factor, max_side=max_side), Image.Resampling.LANCZOS)


def vae_tiling_needed(width: int, height: int, max_pixels: int = VAE_UNTILED_MAX_PIXELS) -> bool:
    """Whether the VAE encodes / decodes an image of this size in tiles (by pixel count alone)."""
    return width * height > max_pixels
