"""Z-Image text-to-image sampling: noise, flow-matching Euler with static shift, CFG, decode.

Numerically follows diffusers' `ZImagePipeline` (0.42): N steps are N model evaluations, the
transformer output is negated before the Euler step, latents stay float32 through the loop and
CFG runs in float32. Differences by design: the shift is a call argument (diffusers only takes
it from the scheduler config), prompt and negative prompt run as separate unpadded sequences
when their padded lengths differ, and the initial noise of image i can come from seed + i.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from models.errors import GenerationInterrupted
from models.z_image.nag import NagGuidance, check_nag
from models.z_image.samplers import check_sampler, sample_step
from models.z_image.text_encoder import MAX_SEQUENCE_LENGTH, PromptEncoder
from models.z_image.transformer import ZImageTransformer, pad_len

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
    return torch.cat(
        [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), device="cpu", dtype=torch.float32)
         for s in seeds]
    )


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
                 nag: NagGuidance | None = None) -> list[torch.Tensor]:
        """One model evaluation per group of captions; groups of equal padded length share a call.

        nag: NAG for the first group (the positive captions), which then runs in a call of its own.
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
        sampler: str = "euler",
        nag_scale: float = 1.0,
        nag_tau: float = 3.5,
        nag_alpha: float = 0.5,
    ) -> PipelineOutput:
        """Text to image. sampler: "euler" (N steps = N evaluations) or "heun" (2N - 1; see
        models.z_image.samplers): callback(i, N, latents) and step_start(i, N) run once per step either
        way, step i's evaluations all under step_start(i)'s settings; interrupt is checked before
        every evaluation but the step's first too.

        nag_scale != 1 turns on NAG (models.z_image.nag) with negative_prompt's embedding: meant for
        guidance 0 (Turbo), where it is the only use of the negative prompt; with CFG it acts on the
        positive pass only. nag_scale 1 (the default) runs exactly the plain model.
        """
        check_sampler(sampler)
        use_nag = check_nag(nag_scale, nag_tau, nag_alpha)
        f2 = self.vae_scale_factor * 2
        if height % f2 or width % f2:
            raise ValueError(f"height and width must be multiples of {f2} (got {width}x{height})")
        n = num_images_per_prompt
        shape = self.latent_shape(height, width)
        seeds = None
        if latents is not None:
            latents = latents.to(device=self.device, dtype=torch.float32)
        elif seed is not None:
            seeds = [seed + i for i in range(n)]
            latents = initial_noise(shape, seeds).to(self.device)
        else:
            latents = torch.randn((n, *shape[1:]), generator=generator, device="cpu", dtype=torch.float32)
            latents = latents.to(self.device)

        shift = self.default_shift if flow_shift is None else flow_shift
        sigmas = flow_sigmas(num_inference_steps, shift)
        use_cfg = cfg_active_steps(sigmas, guidance_scale, cfg_truncation)
        pos = self.encode_prompt(prompt, max_sequence_length)
        neg = self.encode_prompt(negative_prompt or "", max_sequence_length) if any(use_cfg) or use_nag else None
        nag = NagGuidance([neg] * n, nag_scale, nag_tau, nag_alpha) if use_nag else None
        sig_dev = sigmas.to(self.device)

        def predict(x: torch.Tensor, k: int) -> torch.Tensor:
            """Transformer output at sigma index k, CFG applied (float32)."""
            t = (1000 - sig_dev[k] * 1000) / 1000  # diffusers' timestep arithmetic, float32
            t = t.expand(n)
            extra = {} if nag is None else {"nag": nag}
            if use_cfg[k]:
                p_out, n_out = self._predict(x, t, [[pos] * n, [neg] * n], **extra)
                return apply_cfg(p_out, n_out, guidance_scale, cfg_normalization)
            return self._predict(x, t, [[pos] * n], **extra)[0]

        def check_interrupt() -> None:
            if interrupt is not None and interrupt():
                raise GenerationInterrupted()

        for i in range(num_inference_steps):
            check_interrupt()
            if step_start is not None:  # e.g. per-step LoRA strengths
                step_start(i, num_inference_steps)
            latents = sample_step(sampler, latents, i, sig_dev, predict, before_eval=check_interrupt)
            if callback is not None:
                callback(i, num_inference_steps, latents)

        if output_type == "latent":
            return PipelineOutput(images=latents, seeds=seeds)
        if interrupt is not None and interrupt():
            raise GenerationInterrupted()
        # a callable decides now, once the denoising memory is free (the caller may empty caches)
        tiled = vae_tiling() if callable(vae_tiling) else vae_tiling
        return PipelineOutput(images=self.decode(latents, tiled=tiled), seeds=seeds)

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
