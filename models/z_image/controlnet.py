"""Z-Image Turbo Fun ControlNet Union (alibaba-pai, versions 1.0, 2.0 and 2.1) in plain PyTorch.

The ControlNet owns only its control blocks, its control patch embedder and (1.0, 2.1) its control
noise refiner; the timestep/caption/patch embedders, the refiners, the pad tokens and RoPE are the
transformer's, used at call time (`ZImageTransformer.forward(..., control=...)` hands them over),
so nothing is copied. Parameter names follow diffusers' `ZImageControlNetModel`, which are also
the names of the published single files.

Numerics follow diffusers 0.42 (`ZImageControlNetModel` + `ZImageTransformer2DModel`):
- control tokens = control patch embedder of the control latents, image pad tokens = x_pad_token;
- 1.0: a plain refiner (`control_noise_refiner`) refines the control tokens; the control blocks
  read the transformer's own [image, caption] sequence;
- 2.x: a first pass of control blocks (2.0: `control_layers` themselves, 2.1: `control_noise_refiner`)
  runs beside the noise refiner and its first hints are added after the noise refiner's layers at
  `control_refiner_layers_places`; the control blocks then read that hinted sequence;
- each control block's hint (after_proj of its output), times the strength, is added to the main
  layer's output at its place.

One difference, a choice (`ControlInput.main_refiner_hints`): in the publisher's model (VideoX-Fun
`ZImageControlTransformer2DModel`) the main stream's noise refiner takes the 2.x refiner hints too, so
the main layers start from the hinted image tokens; diffusers adds them only in the ControlNet's own
copy of the refiner pass and the main stream starts from unhinted tokens. True (the default) follows
the publisher's model the weights were trained in; False reproduces diffusers (the parity tests).
1.0 has no refiner hints: both give the same result.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.errors import UserError
from models.z_image.checkpoints import convert_transformer_keys, key_mismatch, read_state_dict
from models.z_image.transformer import TransformerBlock, ZImageConfig, ZImageTransformer

# add_control_noise_refiner values (diffusers' config): which blocks run the 2.x refiner pass
REFINER_IS_CONTROL_LAYERS = "control_layers"  # 2.0
REFINER_IS_OWN = "control_noise_refiner"  # 2.1

# keys that tell the published files apart (diffusers' single-file loader uses the same ones)
KEY_ANY = "control_all_x_embedder.2-1.weight"
KEY_V2 = "control_layers.14.adaLN_modulation.0.weight"
KEY_V21 = "control_noise_refiner.0.before_proj.weight"

INPAINT_IN_DIM = 33  # 2.x: 16 control latents + 1 keep-mask + 16 masked-image latents


@dataclass
class ControlNetConfig:
    control_layers_places: list[int] = field(default_factory=lambda: [0, 5, 10, 15, 20, 25])
    control_refiner_layers_places: list[int] | None = None
    control_in_dim: int = 16
    add_control_noise_refiner: str | None = None
    all_patch_size: list[int] = field(default_factory=lambda: [2])
    all_f_patch_size: list[int] = field(default_factory=lambda: [1])
    dim: int = 3840
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True

    @classmethod
    def from_dict(cls, cfg: dict) -> ControlNetConfig:
        known = {f.name for f in fields(cls)}
        out = cls(**{k: v for k, v in cfg.items() if k in known})
        if out.add_control_noise_refiner not in (None, REFINER_IS_CONTROL_LAYERS, REFINER_IS_OWN):
            raise ValueError(f"unknown add_control_noise_refiner {out.add_control_noise_refiner!r}")
        if not out.control_layers_places or out.control_layers_places[0] != 0 or \
                out.control_layers_places != sorted(out.control_layers_places):
            raise ValueError("control_layers_places must be increasing and start at 0")
        return out

    def to_dict(self) -> dict:
        return {"_class_name": "ZImageControlNetModel", **asdict(self)}

    @property
    def version(self) -> str:
        return {None: "1.0", REFINER_IS_CONTROL_LAYERS: "2.0", REFINER_IS_OWN: "2.1"}[self.add_control_noise_refiner]

    def block_config(self) -> ZImageConfig:
        """The transformer-block settings (the blocks are the transformer's, plus two projections)."""
        return ZImageConfig(dim=self.dim, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, norm_eps=self.norm_eps,
                            qk_norm=self.qk_norm)


class ControlBlock(TransformerBlock):
    """A modulated block on the control tokens c: the first block of a chain adds before_proj(c) to the
    sequence it follows; each block returns its new c and its hint after_proj(c). Both projections start
    at zero in training, so a fresh ControlNet changes nothing."""

    def __init__(self, cfg: ZImageConfig, first: bool):
        super().__init__(cfg)
        self.before_proj = nn.Linear(cfg.dim, cfg.dim) if first else None
        self.after_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, c: torch.Tensor, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                adaln: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.before_proj is not None:
            c = self.before_proj(c) + x
        c = super().forward(c, rope, adaln)
        return c, self.after_proj(c)


class ZImageControlNet(nn.Module):
    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.config = cfg
        bcfg = cfg.block_config()
        p, pf = cfg.all_patch_size[0], cfg.all_f_patch_size[0]
        if len(cfg.all_patch_size) != 1 or pf != 1:
            raise ValueError("only the single-frame 2x2 patch layout of Z-Image is supported")
        self.patch = p
        self._key = f"{p}-{pf}"
        self.control_layers = nn.ModuleList([ControlBlock(bcfg, first=i == 0) for i in cfg.control_layers_places])
        self.control_all_x_embedder = nn.ModuleDict({self._key: nn.Linear(p * p * cfg.control_in_dim, cfg.dim)})
        mode = cfg.add_control_noise_refiner
        if mode == REFINER_IS_OWN:
            self.control_noise_refiner = nn.ModuleList(
                [ControlBlock(bcfg, first=i == 0) for i in range(cfg.n_refiner_layers)])
        elif mode is None:
            self.control_noise_refiner = nn.ModuleList([TransformerBlock(bcfg) for _ in range(cfg.n_refiner_layers)])
        else:  # 2.0 runs its control layers in the refiner pass too: no blocks of their own
            self.control_noise_refiner = None

    @property
    def dtype(self) -> torch.dtype:
        return self.control_all_x_embedder[self._key].weight.dtype

    @property
    def in_dim(self) -> int:
        return self.config.control_in_dim

    def check_transformer(self, model: ZImageTransformer) -> None:
        t = model.config
        if t.dim != self.config.dim or max(self.config.control_layers_places) >= t.n_layers:
            raise UserError(f"this ControlNet (width {self.config.dim}, layers up to "
                            f"{max(self.config.control_layers_places)}) does not fit the transformer "
                            f"(width {t.dim}, {t.n_layers} layers)")
        if self.config.control_refiner_layers_places and \
                max(self.config.control_refiner_layers_places) >= t.n_refiner_layers:
            raise UserError("this ControlNet's refiner places do not fit the transformer's noise refiner")

    def embed(self, latents: torch.Tensor, n_tokens: int, pad_token: torch.Tensor) -> torch.Tensor:
        """(B, control_in_dim, H, W) control latents -> (B, n_tokens, dim): patches embedded, the image's
        pad positions filled with the transformer's x_pad_token (as the image tokens are)."""
        b, c, h, w = latents.shape
        p = self.patch
        ht, wt = h // p, w // p
        tokens = latents.view(b, c, ht, p, wt, p).permute(0, 2, 4, 3, 5, 1).reshape(b, ht * wt, p * p * c)
        out = self.control_all_x_embedder[self._key](tokens)
        n_pad = n_tokens - ht * wt
        if n_pad:
            out = torch.cat([out, pad_token.to(out.dtype).expand(b, n_pad, -1)], dim=1)
        return out

    def forward(self, model: ZImageTransformer, latents: torch.Tensor, strength: torch.Tensor,
                img_embedded: torch.Tensor, cap: torch.Tensor, seq: torch.Tensor, adaln: torch.Tensor,
                rope: dict[str, tuple]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The [image, caption] sequence the control blocks read (seq itself for 1.0, the one refined with
        the refiner hints for 2.x) and the hints {main layer index: tensor like seq} for one forward pass
        of `model`.

        latents: control latents, batch 1 or a divisor of seq's batch; strength: a 0-d tensor (a value
        change never retraces a compiled graph); the rest is the transformer's state after its refiners
        (`ZImageTransformer.forward`)."""
        cfg = self.config
        b, n_img = img_embedded.shape[:2]
        latents = latents.to(device=seq.device, dtype=seq.dtype)
        if latents.shape[0] != b:  # one control for the whole batch, or one per image repeated for CFG
            if b % latents.shape[0]:
                raise ValueError(f"control latents of batch {latents.shape[0]} for a batch of {b}")
            latents = latents.repeat(b // latents.shape[0], 1, 1, 1)
        c = self.embed(latents, n_img, model.x_pad_token)
        mode = cfg.add_control_noise_refiner
        if mode is None:
            for block in self.control_noise_refiner:
                c = block(c, rope["img"], adaln)
            x = seq  # the transformer's own refined sequence: same numbers as refining it again
        else:
            blocks = self.control_layers if mode == REFINER_IS_CONTROL_LAYERS else self.control_noise_refiner
            early = []
            for block in blocks:
                c, hint = block(c, img_embedded, rope["img"], adaln)
                early.append(hint)
            places = cfg.control_refiner_layers_places or []
            img = img_embedded
            for i, block in enumerate(model.noise_refiner):
                img = block(img, rope["img"], adaln)
                if i in places:
                    img = img + early[places.index(i)] * strength
            x = torch.cat([img, cap], dim=1)
        c = torch.cat([c, cap], dim=1)
        hints = {}
        for place, block in zip(cfg.control_layers_places, self.control_layers):
            c, hint = block(c, x, rope["all"], adaln)
            hints[place] = hint * strength
        return x, hints


@dataclass
class ControlInput:
    """A ControlNet with its control latents and strength for one sampling run: what the transformer's
    forward takes as `control` (it calls `apply`). main_refiner_hints: see the module's docstring."""

    net: ZImageControlNet
    latents: torch.Tensor
    strength: torch.Tensor
    main_refiner_hints: bool = True

    @property
    def refines_image(self) -> bool:
        """Whether the main stream starts from this ControlNet's hinted refiner pass (2.x with main_refiner_hints):
        the transformer then skips its own noise refiner pass, whose result would be replaced."""
        return self.main_refiner_hints and self.net.config.add_control_noise_refiner is not None

    def apply(self, model: ZImageTransformer, img_embedded: torch.Tensor, cap: torch.Tensor, seq: torch.Tensor,
              adaln: torch.Tensor, rope: dict[str, tuple]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        strength = self.strength.to(device=seq.device, dtype=seq.dtype)
        hinted, hints = self.net(model, self.latents, strength, img_embedded, cap, seq, adaln, rope)
        return (hinted if self.main_refiner_hints else seq), hints


# ---------------------------------------------------------------- loading


def detect_version(keys) -> str:
    """'1.0' or '2.x' from a single file's keys (2.0 vs 2.1 needs a tensor's values: `_single_file_config`).

    Raises UserError for a file that is no Z-Image ControlNet."""
    keys = set(keys)
    if KEY_ANY not in keys:
        raise UserError(f"not a Z-Image ControlNet file: no {KEY_ANY}")
    return "2.x" if KEY_V2 in keys else "1.0"


def _count(keys, prefix: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


QUANTO_DATA = ".weight._data"  # a quanto int8 weight's data (its scale: ".weight._scale")


def _weights_view(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sd with a quanto int8 weight's data under the weight's own name (the same shape; zero where the weight is
    zero), for telling the version and sizes apart; scales left out."""
    out = {}
    for k, v in sd.items():
        if k.endswith(("._scale", ".input_scale", ".output_scale")):
            continue
        out[k.removesuffix("._data")] = v
    return out


def _single_file_config(sd: dict[str, torch.Tensor], transformer: ZImageConfig) -> ControlNetConfig:
    """The config of a published single file, from its tensors and the transformer it goes with."""
    version = detect_version(sd)
    emb = sd[KEY_ANY]
    dim = emb.shape[0]
    p = transformer.all_patch_size[0]
    n_control = _count(sd, "control_layers.")
    if n_control == 0 or transformer.n_layers % n_control:
        raise UserError(f"{n_control} control layers do not spread evenly over {transformer.n_layers} layers")
    step = transformer.n_layers // n_control  # 1.0: every 5th layer of 30, 2.x: every 2nd
    head = sd.get("control_layers.0.attention.norm_q.weight")
    n_heads = dim // head.shape[0] if head is not None else transformer.n_heads
    cfg = dict(control_layers_places=list(range(0, transformer.n_layers, step)), control_in_dim=emb.shape[1] // (p * p),
               dim=dim, n_heads=n_heads, n_kv_heads=n_heads, qk_norm=head is not None, norm_eps=transformer.norm_eps,
               n_refiner_layers=_count(sd, "control_noise_refiner.") or transformer.n_refiner_layers,
               all_patch_size=[p], all_f_patch_size=[1])
    if version == "2.x":
        before = sd.get(KEY_V21)
        # 2.0 files carry an unused control_noise_refiner whose before_proj is zero (or none at all)
        v21 = before is not None and bool(before.count_nonzero())
        cfg.update(control_refiner_layers_places=list(range(transformer.n_refiner_layers)),
                   add_control_noise_refiner=REFINER_IS_OWN if v21 else REFINER_IS_CONTROL_LAYERS)
    return ControlNetConfig.from_dict(cfg)


def load_controlnet(path: str | Path, transformer: ZImageConfig, dtype: torch.dtype = torch.bfloat16,
                    device: torch.device | str = "cpu") -> ZImageControlNet:
    """A ControlNet from a published single .safetensors file (version told from its keys) or a diffusers
    folder (config.json + *.safetensors). Wrong files raise UserError naming missing/unexpected keys."""
    path = Path(path)
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise UserError(f"ControlNet folder {path} has no config.json")
        try:
            cfg = ControlNetConfig.from_dict(json.loads(cfg_path.read_text()))
        except (ValueError, TypeError) as e:
            raise UserError(f"bad ControlNet config {cfg_path}: {e}") from None
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise UserError(f"ControlNet folder {path} has no .safetensors file")
        sd = convert_transformer_keys(read_state_dict(files))
    else:
        files = [path]
        sd = convert_transformer_keys(read_state_dict(files))
        cfg = _single_file_config(_weights_view(sd), transformer)
    if cfg.add_control_noise_refiner == REFINER_IS_CONTROL_LAYERS:  # 2.0: its refiner tensors are unused
        sd = {k: v for k, v in sd.items() if not k.startswith("control_noise_refiner.")}
    with torch.device("meta"):
        net = ZImageControlNet(cfg)
    if any(k.endswith(QUANTO_DATA) for k in sd):  # a quanto int8 file (DeepBeepMeep's *_quanto_bf16_int8)
        from models.z_image import quantize as q

        q.load_int8_state(net, sd, files, f"ControlNet {path.name}", dtype)
        return net.to(device).eval().requires_grad_(False)
    expected = set(net.state_dict())
    problem = key_mismatch(expected - sd.keys(), sd.keys() - expected)
    if problem:
        raise UserError(f"ControlNet {path} (read as version {cfg.version}) does not match the model: {problem}")
    try:
        net.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"ControlNet {path} has wrong tensor shapes: {str(e).strip().splitlines()[-1]}") from None
    return net.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------- control latents


def _encode(pipe, pixels: torch.Tensor, tiled: bool) -> torch.Tensor:
    """(1, 3, H, W) pixels in [-1, 1] -> float32 latents (posterior mean, shifted and scaled)."""
    cfg = pipe.vae.config
    if tiled:
        pipe.vae.enable_tiling()
    try:
        z = pipe.vae.encode(pixels.to(device=pipe.device, dtype=pipe.vae.dtype)).latent_dist.mode().float()
    finally:
        if tiled:
            pipe.vae.disable_tiling()
    return (z - cfg.shift_factor) * cfg.scaling_factor


@torch.no_grad()
def control_latents(pipe, net: ZImageControlNet, control_image, width: int, height: int, image=None,
                    mask_image=None) -> torch.Tensor:
    """(1, control_in_dim, H/8, W/8) float32 control context for `pipe` (a models.z_image.pipeline.ZImagePipeline).

    The control image is resized to the render size (Lanczos) and encoded to its posterior mean. Plain
    control pads it with zero channels to the ControlNet's input width (diffusers' ZImageControlNetPipeline).
    With image and mask_image (2.x only: ZImageControlNetInpaintPipeline): channels [control latents,
    keep mask (1 - mask, nearest on the latent grid), latents of the image with the repaint area zeroed
    (grey)]; the mask is white = repaint, binarized at 0.5.
    """
    from models import image_inputs as ii

    tiled = ii.vae_tiling_needed(width, height)

    def pixels(img) -> torch.Tensor:
        arr = ii.image_to_array(ii.fit_image(ii.as_image(img), width, height))
        return 2.0 * torch.from_numpy(arr).permute(2, 0, 1)[None] - 1.0

    ctrl = _encode(pipe, pixels(control_image), tiled)
    if (image is None) != (mask_image is None):
        raise UserError("ControlNet inpainting takes both an image and a mask")
    if image is None:
        pad = net.in_dim - ctrl.shape[1]
        if pad < 0:
            raise UserError(f"ControlNet input width {net.in_dim} is below the latent channels {ctrl.shape[1]}")
        return torch.cat([ctrl, ctrl.new_zeros(1, pad, *ctrl.shape[2:])], dim=1) if pad else ctrl
    if net.in_dim != 2 * ctrl.shape[1] + 1:
        raise UserError(f"this ControlNet (version {net.config.version}) has no inpaint channels")
    repaint = torch.from_numpy(ii.mask_to_array(mask_image, width, height).astype(np.float32))[None, None]
    masked = _encode(pipe, pixels(image) * (repaint < 0.5), tiled)
    keep = F.interpolate(1 - repaint, size=ctrl.shape[-2:], mode="nearest").to(ctrl.device)
    return torch.cat([ctrl, keep, masked], dim=1)


def control_input(pipe, net: ZImageControlNet, control_image, strength: float, width: int, height: int,
                  image=None, mask_image=None, main_refiner_hints: bool = True) -> ControlInput | None:
    """What `ZImagePipeline.__call__(control=...)` takes: the ControlNet, its control latents (see
    `control_latents`) and the strength as a 0-d tensor. Strength 0 gives None: the ControlNet is not run
    at all, so the image is exactly the text-to-image one."""
    net.check_transformer(pipe.transformer)
    if strength == 0:
        return None
    latents = control_latents(pipe, net, control_image, width, height, image, mask_image)
    return ControlInput(net, latents.to(pipe.device), torch.tensor(float(strength), device=pipe.device),
                        main_refiner_hints)
