"""Z-Image text-to-image sampling: noise, flow-matching Euler with static shift, CFG, decode.

Numerically follows diffusers' `ZImagePipeline` (0.42): N steps are N model evaluations, the
transformer output is negated before the Euler step, latents stay float32 through the loop and
CFG runs in float32. Differences by design: the shift is a call argument (diffusers only takes
it from the scheduler config), prompt and negative prompt run as separate unpadded sequences
when their padded lengths differ, and the initial noise of image i can come from seed + i.

Image inputs (diffusers' ZImageImg2ImgPipeline / ZImageInpaintPipeline semantics): the image is
encoded to the VAE posterior *mean* (diffusers samples it, consuming the generator first), so the
noise of image i stays the first draw of seed + i; strength S starts the full N-step schedule at
`start_index(N, S)`. Preprocessing (resize, mask threshold) is models/image_inputs.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from models import image_inputs as ii
from models.errors import GenerationInterrupted, UserError
from models.z_image import samplers as zs
from models.z_image import variety as var
from models.z_image.nag import NagGuidance, check_nag
from models.z_image.samplers import check_sampler, sample_step
from models.z_image.text_encoder import MAX_SEQUENCE_LENGTH, PromptEncoder
from models.z_image.transformer import ControlHook, ZImageTransformer, pad_len

StepCallback = Callable[[int, int, torch.Tensor], None]


def flow_sigmas(steps: int, shift: float) -> torch.Tensor:
    """steps shifted sigmas from 1 down to 1/steps, then a terminal 0 (float32, CPU)."""
    base = np.array(torch.linspace(1.0, 1.0 / steps, steps, device="cpu").tolist()).astype(np.float32)
    shifted = shift * base / (1 + (shift - 1) * base)
    return torch.cat([torch.from_numpy(shifted).float(), torch.zeros(1, device="cpu")])


def cfg_active_steps(sigmas: torch.Tensor, guidance: float, truncation: float) -> list[bool]:
    """Per step, whether CFG runs: off when guidance is 0, or when 1 - sigma exceeds the truncation."""
    steps = len(sigmas) - 1
    if guidance <= 0:
        return [False] * steps
    if truncation is None or float(truncation) > 1:
        return [True] * steps
    t_norm = ((1000 - sigmas[:-1] * 1000) / 1000).tolist()  # same float32 arithmetic as diffusers
    return [tn <= truncation for tn in t_norm]


def apply_cfg(pos: torch.Tensor, neg: torch.Tensor, guidance: float, normalization: float) -> torch.Tensor:
    """pos + g (pos - neg); with normalization k > 0, each image's norm is capped at k * |pos|."""
    pred = pos + guidance * (pos - neg)
    if normalization and normalization > 0:
        dims = tuple(range(1, pred.ndim))
        pos_norm = torch.linalg.vector_norm(pos, dim=dims, keepdim=True)
        pred_norm = torch.linalg.vector_norm(pred, dim=dims, keepdim=True)
        # a clamp instead of a Python `if`: no host sync on the GPU
        ratio = (pos_norm * float(normalization) / pred_norm.clamp_min(1e-20)).clamp(max=1.0)
        pred = pred * ratio
    return pred


def initial_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """Noise of image i from a CPU generator seeded with seeds[i] (reproducible alone)."""
    return noise_streams(shape, seeds)[0]


def noise_streams(shape: tuple[int, ...], seeds: list[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """`initial_noise` and the generators it drew from, which go on to give each image's later noise (the
    twinflow sampler's): image i's noise stays the first draw of seeds[i] whatever follows."""
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return torch.cat([torch.randn(shape, generator=g, device="cpu", dtype=torch.float32) for g in gens]), gens


def scale_noise(image_latents: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching forward process at sigma: sigma * noise + (1 - sigma) * image (diffusers' arithmetic)."""
    return sigma * noise + (1.0 - sigma) * image_latents


@dataclass
class PipelineOutput:
    images: list[Image.Image]
    seeds: list[int] | None


class ZImagePipeline:
    def __init__(
        self,
        transformer: ZImageTransformer,
        text_encoder: PromptEncoder,
        vae,
        default_shift: float = 3.0,
        device: torch.device | str = "cpu",
    ):
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.vae = vae
        self.default_shift = default_shift
        self.device = torch.device(device)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.vae_scale_factor
        return (1, self.latent_channels, height // f, width // f)

    def encode_prompt(self, prompt: str, max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> torch.Tensor:
        return self.text_encoder.encode(prompt, max_sequence_length, device=self.device)

    def _predict(self, x: torch.Tensor, t: torch.Tensor, groups: list[list[torch.Tensor]],
                 nag: NagGuidance | None = None, target: torch.Tensor | None = None,
                 control: ControlHook | None = None) -> list[torch.Tensor]:
        """One model evaluation per group of captions; groups of equal padded length share a call.

        nag: NAG for the first group (the positive captions), which then runs in a call of its own.
        target: TwinFlow's target times (B,), as t, for every group.
        control: ControlNet hints (models.z_image.controlnet.ControlInput) for every group.
        """
        dtype = self.transformer.dtype
        merged: dict[int | str, list[int]] = {}
        for gi, caps in enumerate(groups):
            merged.setdefault("nag" if nag is not None and gi == 0 else pad_len(caps[0].shape[0]), []).append(gi)
        outs: list[torch.Tensor | None] = [None] * len(groups)
        b = x.shape[0]
        for key, members in merged.items():
            caps = [c for gi in members for c in groups[gi]]
            n = len(members)
            extra = {"nag": nag} if key == "nag" else {}
            if target is not None:
                extra["target"] = target.repeat(n)
            if control is not None:
                extra["control"] = control
            out = self.transformer(x.to(dtype).repeat(n, 1, 1, 1), t.repeat(n), caps, **extra).float()
            for j, gi in enumerate(members):
                outs[gi] = out[j * b:(j + 1) * b]
        return outs

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 30,
        guidance_scale: float = 4.0,
        flow_shift: float | None = None,
        cfg_normalization: float = 0.0,
        cfg_truncation: float = 1.0,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        callback: StepCallback | None = None,
        interrupt: Callable[[], bool] | None = None,
        step_start: Callable[[int, int], None] | None = None,
        output_type: str = "pil",
        vae_tiling: bool | Callable[[], bool] = False,
        image: ii.ImageLike | None = None,
        mask_image: ii.MaskLike | None = None,
        strength: float = 1.0,
        vae_encode_tiling: bool | None = None,
        sampler: str = "euler",
        nag_scale: float = 1.0,
        nag_tau: float = 3.5,
        nag_alpha: float = 0.5,
        variety: float = 0.0,
        variety_until: float = var.DEFAULT_UNTIL,
        unified: zs.UnifiedConfig | dict | None = None,
        control: ControlHook | None = None,
    ) -> PipelineOutput:
        """Text-to-image, or with `image` img2img, or with `image` and `mask_image` inpainting.

        image: PIL image or path, resized (Lanczos) to width x height and encoded to its posterior mean.
        mask_image: white = repaint (any size; nearest, grey >= 0.5 is white); after each step the kept
        area is reset to the image latents noised to the next sigma with the same noise.
        strength S in (0, 1]: run the last ~N*S steps of the N-step schedule from the noised image;
        S = 1 without a mask ignores the image (the same result as text-to-image, and no encode).
        latents: the initial noise (as in text-to-image); with an image it is noised in by scale_noise.
        vae_encode_tiling: None decides by pixel count (image_inputs.vae_tiling_needed). The decode is
        tiled when vae_tiling says so or by the same pixel count.
        Callbacks see step k of the steps that run (N - start), not the index in the full schedule.

        sampler: "euler" (N steps = N evaluations) or "heun" (2N - 1; see models.z_image.samplers):
        callback and step_start run once per step either way, step k's evaluations all under
        step_start(k)'s settings; interrupt is checked before every evaluation.
        nag_scale != 1 turns on NAG (models.z_image.nag) with negative_prompt's embedding: meant for
        guidance 0 (Turbo), where it is the only use of the negative prompt; with CFG it acts on the
        positive pass only. nag_scale 1 (the default) runs exactly the plain model.

        sampler "twinflow": UCGM's unified sampler for TwinFlow checkpoints (models.z_image.samplers), meant
        for 1-4 steps at guidance 0: its own schedule (flow_shift is not used) and a target time per step.
        unified: its settings (a UnifiedConfig, or overrides of the step count's preset by field name,
        e.g. {"stochast_ratio": 0.0}). Its fresh noise at each step continues image i's latent-noise
        generator (seed + i), so an image still re-renders from its seed. No image inputs with it.
        variety S > 0: seed variety (models.z_image.variety): image i's positive caption embedding gets
        seeded noise S * std(embedding) during the first ceil(variety_until * steps) steps run. 0 (the
        default) runs exactly the plain pipeline.
        control: a ControlNet with its control latents and strength (models.z_image.controlnet: `ControlInput`,
        made by `control_input`); None runs exactly the plain pipeline. Not with NAG.
        """
        check_sampler(sampler)
        use_nag = check_nag(nag_scale, nag_tau, nag_alpha)
        use_variety = var.check_variety(variety, variety_until)
        twinflow = sampler == zs.TWINFLOW
        if control is not None and use_nag:
            raise UserError("NAG cannot be combined with a ControlNet")
        f2 = self.vae_scale_factor * 2
        if height % f2 or width % f2:
            raise ValueError(f"height and width must be multiples of {f2} (got {width}x{height})")
        strength = ii.check_image_inputs(image, mask_image, strength)
        if image is not None:
            image = ii.as_image(image)  # a bad file fails now, even where the image is not needed
        if image is not None and mask_image is None and strength >= 1.0:
            image = None  # sigma 1: the start latent is the noise itself; skip the encode
        if twinflow and image is not None:
            raise UserError("the twinflow sampler takes no image input (img2img, inpainting): use euler or heun")
        n = num_images_per_prompt
        shape = self.latent_shape(height, width)
        seeds = streams = None
        if latents is not None:
            latents = latents.to(device=self.device, dtype=torch.float32)
        elif seed is not None:
            seeds = [seed + i for i in range(n)]
            latents, streams = noise_streams(shape, seeds)
            latents = latents.to(self.device)
        else:
            latents = torch.randn((n, *shape[1:]), generator=generator, device="cpu", dtype=torch.float32)
            latents = latents.to(self.device)

        shift = self.default_shift if flow_shift is None else flow_shift
        ucfg = None
        if twinflow:
            ucfg = (unified if isinstance(unified, zs.UnifiedConfig)
                    else zs.unified_config(num_inference_steps, **(unified or {})))
            sigmas = zs.unified_sigmas(num_inference_steps, ucfg)
        else:
            sigmas = flow_sigmas(num_inference_steps, shift)
        first = 0
        if image is not None:
            first = ii.start_index(num_inference_steps, strength)
            if first >= num_inference_steps:
                raise UserError(f"strength {strength:g} is too low for {num_inference_steps} steps: no step would run")
        steps_run = num_inference_steps - first
        use_cfg = cfg_active_steps(sigmas, guidance_scale, cfg_truncation)  # by sigma index
        mask = image_latents = noise = None
        if image is not None:
            mask = self._latent_mask(mask_image, height, width) if mask_image is not None else None
            image = ii.fit_image(image, width, height)
            tiled = ii.vae_tiling_needed(width, height) if vae_encode_tiling is None else vae_encode_tiling
            image_latents = self.encode_image(image, tiled=tiled).expand(latents.shape[0], -1, -1, -1)
        pos = self.encode_prompt(prompt, max_sequence_length)
        needs_neg = any(use_cfg[first:]) or use_nag
        neg = self.encode_prompt(negative_prompt or "", max_sequence_length) if needs_neg else None
        nag = NagGuidance([neg] * n, nag_scale, nag_tau, nag_alpha) if use_nag else None
        sig_dev = sigmas.to(self.device)
        if image_latents is not None:
            noise = latents
            latents = scale_noise(image_latents, sig_dev[first], noise)
        plain_caps = step_caps = [pos] * n
        varied_caps, n_varied = plain_caps, 0
        if use_variety:
            varied_caps = [var.perturbed_caption(pos, variety, s) for s in var.image_seeds(n, seeds, generator)]
            n_varied = var.variety_steps(steps_run, variety_until)

        def predict(x: torch.Tensor, k: int) -> torch.Tensor:
            """Transformer output at sigma index k, CFG applied (float32)."""
            extra = {} if nag is None else {"nag": nag}
            if control is not None:
                extra["control"] = control
            if twinflow:  # TwinFlow's sigma -> time mapping, and the step's target time
                t = zs.ucgm_time(sig_dev[k])
                extra["target"] = zs.ucgm_time(zs.unified_target(ucfg.style, sig_dev[k], sig_dev[k + 1])).expand(n)
            else:
                t = (1000 - sig_dev[k] * 1000) / 1000  # diffusers' timestep arithmetic, float32
            t = t.expand(n)
            if use_cfg[k]:
                p_out, n_out = self._predict(x, t, [step_caps, [neg] * n], **extra)
                return apply_cfg(p_out, n_out, guidance_scale, cfg_normalization)
            return self._predict(x, t, [step_caps], **extra)[0]

        def fresh_noise() -> torch.Tensor:
            """The twinflow sampler's new noise: the next draw of each image's stream (of the generator, or
            torch's global RNG, without a seed)."""
            if streams is not None:
                z = torch.cat([torch.randn(shape, generator=g, device="cpu", dtype=torch.float32) for g in streams])
            else:
                z = torch.randn(tuple(latents.shape), generator=generator, device="cpu", dtype=torch.float32)
            return z.to(self.device)

        ustate = zs.UnifiedState()

        def check_interrupt() -> None:
            if interrupt is not None and interrupt():
                raise GenerationInterrupted()

        for k, i in enumerate(range(first, num_inference_steps)):
            check_interrupt()
            if step_start is not None:  # e.g. per-step LoRA strengths
                step_start(k, steps_run)
            step_caps = varied_caps if k < n_varied else plain_caps
            if twinflow:
                latents = zs.unified_step(latents, predict(latents, i), sig_dev[i], sig_dev[i + 1], ucfg,
                                          fresh_noise, ustate)
            else:
                latents = sample_step(sampler, latents, i, sig_dev, predict, before_eval=check_interrupt)
            if mask is not None:  # the kept area follows the image, noised like the latents now are
                kept = image_latents if i == num_inference_steps - 1 else scale_noise(
                    image_latents, sig_dev[i + 1], noise)
                latents = (1 - mask) * kept + mask * latents
            if callback is not None:
                callback(k, steps_run, latents)

        if output_type == "latent":
            return PipelineOutput(images=latents, seeds=seeds)
        if interrupt is not None and interrupt():
            raise GenerationInterrupted()
        # a callable decides now, once the denoising memory is free (the caller may empty caches)
        tiled = (vae_tiling() if callable(vae_tiling) else vae_tiling) or ii.vae_tiling_needed(width, height)
        return PipelineOutput(images=self.decode(latents, tiled=tiled), seeds=seeds)

    def _latent_mask(self, mask_image: ii.MaskLike, height: int, width: int) -> torch.Tensor:
        """(1, 1, h, w) float32 0/1 on the latent grid: the pixel mask downsampled nearest (diffusers)."""
        m = torch.from_numpy(ii.mask_to_array(mask_image, width, height).astype(np.float32))[None, None]
        f = self.vae_scale_factor
        m = torch.nn.functional.interpolate(m, size=(height // f, width // f), mode="nearest")
        if not bool(m.any()):
            raise UserError(f"the mask's white area is too thin to repaint: paint strokes at least {f} px wide")
        return m.to(self.device)

    @torch.no_grad()
    def encode_image(self, image: Image.Image, tiled: bool = False) -> torch.Tensor:
        """(1, C, H/f, W/f) float32 latents of an RGB image: the posterior mean, shifted and scaled as
        the inverse of `decode`. The image must already have the render size (`image_inputs.fit_image`)."""
        cfg = self.vae.config
        x = torch.from_numpy(ii.image_to_array(image)).permute(2, 0, 1)[None]
        x = (2.0 * x - 1.0).to(device=self.device, dtype=self.vae.dtype)  # [-1, 1] as diffusers normalizes
        if tiled:
            self.vae.enable_tiling()
        try:
            z = self.vae.encode(x).latent_dist.mode().float()
        finally:
            if tiled:
                self.vae.disable_tiling()
        return (z - cfg.shift_factor) * cfg.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool = False) -> list[Image.Image]:
        cfg = self.vae.config
        z = latents.to(self.vae.dtype) / cfg.scaling_factor + cfg.shift_factor
        if tiled:
            self.vae.enable_tiling()
        try:
            x = self.vae.decode(z, return_dict=False)[0]
        finally:
            if tiled:
                self.vae.disable_tiling()
        x = (x.float() * 0.5 + 0.5).clamp(0, 1)
        arr = (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        return [Image.fromarray(a) for a in arr]
