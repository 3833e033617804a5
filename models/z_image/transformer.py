"""The Z-Image S3-DiT (single-stream diffusion transformer) in plain PyTorch.

Parameter names and shapes follow diffusers' `ZImageTransformer2DModel` exactly, so its state
dicts load without renaming. The forward pass takes a batch of latents whose captions all pad to
the same multiple of 32, so no attention mask is ever needed: the pipeline runs prompt and
negative prompt as separate sequences when their padded lengths differ.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import BACKENDS, attention
from models.z_image.nag import NagGuidance, NagLayer, nag_blend

SEQ_MULTIPLE = 32  # each segment (image tokens, caption tokens) pads to this multiple
ADALN_MAX_DIM = 256
T_EMBED_MID = 1024
T_FREQ_DIM = 256


@dataclass
class ZImageConfig:
    all_patch_size: list[int] = field(default_factory=lambda: [2])
    all_f_patch_size: list[int] = field(default_factory=lambda: [1])
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: list[int] = field(default_factory=lambda: [32, 48, 48])
    axes_lens: list[int] = field(default_factory=lambda: [1536, 512, 512])

    @classmethod
    def from_dict(cls, cfg: dict) -> ZImageConfig:
        known = {f.name for f in fields(cls)}
        out = cls(**{k: v for k, v in cfg.items() if k in known})
        if cfg.get("siglip_feat_dim"):
            raise ValueError("Z-Image Omni checkpoints (SigLIP features) are not supported")
        if out.dim % out.n_heads or out.dim // out.n_heads != sum(out.axes_dims):
            raise ValueError(
                f"inconsistent transformer config: dim {out.dim} / {out.n_heads} heads "
                f"!= sum(axes_dims) {sum(out.axes_dims)}"
            )
        return out

    def to_dict(self) -> dict:
        return {"_class_name": "ZImageTransformer2DModel", **asdict(self)}


def pad_len(n: int) -> int:
    """Length of a segment of n tokens once padded to the sequence multiple."""
    return n + (-n) % SEQ_MULTIPLE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3)... of the head dim by RopeTables' full-width tables
    (B|1, S, D): cos repeated per pair, sin signed (-s, +s). x*cos + pairs_swapped(x)*sin is the same
    arithmetic per element as the (re*c - im*s, re*s + im*c) form, in one fused expression: 13 ms of the
    compiled H200 step against 25 ms (bench/RESULTS.md, session 6)."""
    xf = x.float()
    # not Tensor.unflatten: dynamo cannot trace it under the default-device mode that mmgp leaves behind
    swapped = xf.reshape(*x.shape[:-1], -1, 2).flip(-1).flatten(-2)
    return (xf * cos.unsqueeze(2) + swapped * sin.unsqueeze(2)).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, qk_norm: bool):
        super().__init__()
        self.n_heads = n_heads
        head_dim = dim // n_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])
        # diffusers builds these norms with eps 1e-5 whatever the block's norm_eps
        self.norm_q = RMSNorm(head_dim, 1e-5) if qk_norm else None
        self.norm_k = RMSNorm(head_dim, 1e-5) if qk_norm else None
        self.backend = "sdpa"  # models.attention backend; set for the whole model by set_attention_backend

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], nag: NagLayer | None = None
                ) -> torch.Tensor:
        q = self.to_q(x).reshape(*x.shape[:-1], self.n_heads, -1)
        k = self.to_k(x).reshape(*x.shape[:-1], self.n_heads, -1)
        v = self.to_v(x).reshape(*x.shape[:-1], self.n_heads, -1)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        if nag is not None:
            return self.to_out[0](self._nag_attention(q, k, v, rope, nag))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v, self.backend).flatten(2)
        return self.to_out[0](out)

    def _nag_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       rope: tuple[torch.Tensor, torch.Tensor], nag: NagLayer) -> torch.Tensor:
        """Attention of an [image, caption, negative] sequence with NAG on the image segment (models.z_image.nag)."""
        a, b = nag.n_img, nag.n_img + nag.n_cap
        pos = attention(apply_rope(q[:, :b], *rope), apply_rope(k[:, :b], *rope), v[:, :b], self.backend).flatten(2)
        qn, kn, vn = (torch.cat([t[:, :a], t[:, b:]], dim=1) for t in (q, k, v))
        neg = attention(apply_rope(qn, *nag.rope_neg), apply_rope(kn, *nag.rope_neg), vn, self.backend).flatten(2)
        img = nag_blend(pos[:, :a], neg[:, :a], nag.scale, nag.tau, nag.alpha)
        return torch.cat([img, pos[:, a:], neg[:, a:]], dim=1)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _BlockBase(nn.Module):
    """Sandwich-normed attention + SwiGLU (the parts every block shares)."""

    is_compiled_region = False  # set by compile_blocks: app.offload keeps mmgp's checks out of such blocks

    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        dim = cfg.dim
        self.attention = Attention(dim, cfg.n_heads, cfg.qk_norm)
        self.feed_forward = FeedForward(dim, int(dim / 3 * 8))
        self.attention_norm1 = RMSNorm(dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(dim, cfg.norm_eps)


class TransformerBlock(_BlockBase):
    """Block modulated by the timestep: adaLN scales and tanh gates (noise refiner, main layers)."""

    def __init__(self, cfg: ZImageConfig):
        super().__init__(cfg)
        self.adaLN_modulation = nn.Sequential(nn.Linear(min(cfg.dim, ADALN_MAX_DIM), 4 * cfg.dim, bias=True))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], adaln: torch.Tensor,
                nag: NagLayer | None = None) -> torch.Tensor:
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln).unsqueeze(1).chunk(4, dim=2)
        attn = self.attention(self.attention_norm1(x) * (1.0 + scale_msa), rope, nag)
        x = x + gate_msa.tanh() * self.attention_norm2(attn)
        ffn = self.feed_forward(self.ffn_norm1(x) * (1.0 + scale_mlp))
        return x + gate_mlp.tanh() * self.ffn_norm2(ffn)


class ContextBlock(_BlockBase):
    """Caption refiner block: no timestep modulation. A class of its own so compiled code of the
    two kinds never competes for one code object's cache."""

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope))
        return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))


class TimestepEmbedder(nn.Module):
    def __init__(self, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(T_FREQ_DIM, T_EMBED_MID), nn.SiLU(), nn.Linear(T_EMBED_MID, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = T_FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_dim, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(dim, ADALN_MAX_DIM), dim, bias=True))

    def forward(self, x: torch.Tensor, adaln: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.adaLN_modulation(adaln).unsqueeze(1)
        x = F.layer_norm(x, (x.shape[-1],), eps=1e-6) * scale
        return self.linear(x)


class RopeTables:
    """Per-axis cos/sin tables (built once per device) and the per-shape position tables.

    The tables for the last few (caption length, grid) shapes are kept, so a denoising loop
    looks them up instead of rebuilding them every step.
    """

    def __init__(self, theta: float, axes_dims: list[int], axes_lens: list[int]):
        self.theta, self.axes_dims, self.axes_lens = theta, list(axes_dims), list(axes_lens)
        self._axes: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._shapes: dict[tuple, tuple] = {}

    def _axis_tables(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if device not in self._axes:
            tables = []
            for d, n in zip(self.axes_dims, self.axes_lens):
                inv = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
                ang = torch.outer(torch.arange(n, dtype=torch.float64, device="cpu"), inv).float()
                tables.append((torch.cos(ang).to(device), torch.sin(ang).to(device)))
            self._axes[device] = tables
        return self._axes[device]

    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self._axis_tables(ids.device)
        cos = torch.cat([tables[i][0][ids[:, i]] for i in range(len(tables))], dim=-1)
        sin = torch.cat([tables[i][1][ids[:, i]] for i in range(len(tables))], dim=-1)
        # full head width for apply_rope: each angle's cos twice, its sin as (-sin, +sin)
        cos = cos.repeat_interleave(2, dim=-1)
        sin = torch.stack((-sin, sin), dim=-1).flatten(-2)
        return cos[None], sin[None]

    def for_shape(self, cap_len: int, h: int, w: int, device: torch.device) -> dict[str, tuple]:
        """RoPE for caption (cap_len padded tokens) and an h x w token grid, and their concatenation."""
        key = (cap_len, h, w, device)
        if key not in self._shapes:
            n_img = h * w
            cap_ids = torch.zeros(cap_len, 3, dtype=torch.long, device="cpu")
            cap_ids[:, 0] = torch.arange(1, cap_len + 1, device="cpu")
            img_ids = torch.zeros(pad_len(n_img), 3, dtype=torch.long, device="cpu")
            hh, ww = torch.meshgrid(torch.arange(h, device="cpu"), torch.arange(w, device="cpu"), indexing="ij")
            img_ids[:n_img, 0] = cap_len + 1
            img_ids[:n_img, 1] = hh.flatten()
            img_ids[:n_img, 2] = ww.flatten()  # image pad tokens keep position (0, 0, 0)
            cap = self.lookup(cap_ids.to(device))
            img = self.lookup(img_ids.to(device))
            both = (torch.cat([img[0], cap[0]], dim=1), torch.cat([img[1], cap[1]], dim=1))
            if len(self._shapes) >= 8:
                self._shapes.pop(next(iter(self._shapes)))
            self._shapes[key] = {"cap": cap, "img": img, "all": both}
        return self._shapes[key]


class ControlHook(Protocol):
    """What the forward pass asks of a ControlNet: the sequence the main layers start from (the refined one,
    or one whose noise refiner took hints too) and the hints to add after main layers, by layer index."""

    # True: apply() runs the noise refiner itself and its result replaces the model's, so the model skips its own
    # pass (2.x ControlNets whose refiner hints reach the main stream)
    refines_image: bool

    def apply(self, model: ZImageTransformer, img_embedded: torch.Tensor, cap: torch.Tensor, seq: torch.Tensor,
              adaln: torch.Tensor, rope: dict[str, tuple]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]: ...


class ZImageTransformer(nn.Module):
    """The S3-DiT. TwinFlow checkpoints (models.z_image.samplers, "twinflow") also take a target time: see
    `time_embedding`; a checkpoint with `t_embedder_2.*` tensors gets that auxiliary embedder
    (`add_target_embedder`) and uses it for the target, else the target goes through `t_embedder` too."""

    TARGET_EMBEDDER = "t_embedder_2"

    @property
    def fp32_input_modules(self) -> tuple[str, ...]:
        """Modules taking float32 inputs as they are under mmgp offload (app/offload.py): the timestep
        embeddings must not be rounded to the model dtype first."""
        return ("", "t_embedder", *((self.TARGET_EMBEDDER,) if self.has_target_embedder else ()))

    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        self.config = cfg
        dim, p, pf = cfg.dim, cfg.all_patch_size[0], cfg.all_f_patch_size[0]
        if len(cfg.all_patch_size) != 1 or pf != 1:
            raise ValueError("only the single-frame 2x2 patch layout of Z-Image is supported")
        self.patch = p
        self.in_channels = cfg.in_channels
        key = f"{p}-{pf}"
        self.all_x_embedder = nn.ModuleDict({key: nn.Linear(p * p * cfg.in_channels, dim, bias=True)})
        self.all_final_layer = nn.ModuleDict({key: FinalLayer(dim, p * p * cfg.in_channels)})
        self.noise_refiner = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_refiner_layers)])
        self.context_refiner = nn.ModuleList([ContextBlock(cfg) for _ in range(cfg.n_refiner_layers)])
        self.t_embedder = TimestepEmbedder(min(dim, ADALN_MAX_DIM))
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, dim))
        self.x_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.layers = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.rope = RopeTables(cfg.rope_theta, cfg.axes_dims, cfg.axes_lens)
        self._key = key
        # a ControlNet loaded with the model (models/z_image/controlnet.py) rides along as a submodule, so a memory
        # manager that streams this model's blocks (mmgp) streams the control blocks with them; the job's
        # ControlInput still names the net it runs. Attached after loading: the weight files never hold it.
        self.controlnet: nn.Module | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.x_pad_token.dtype

    @property
    def has_target_embedder(self) -> bool:
        return self.TARGET_EMBEDDER in self._modules

    def add_target_embedder(self) -> TimestepEmbedder:
        """Give the model TwinFlow's auxiliary target-time embedder (`t_embedder_2`, t_embedder's shapes).

        On a meta model (the loaders, which then load its tensors) it is empty; on a real one it starts as
        a copy of t_embedder, as TwinFlow initializes it for training."""
        if not self.has_target_embedder:
            p = self.t_embedder.mlp[0].weight
            with torch.device(p.device):
                emb = TimestepEmbedder(self.t_embedder.mlp[2].out_features).to(p.dtype)
            if p.device.type != "meta":
                emb.load_state_dict(self.t_embedder.state_dict())
            self.add_module(self.TARGET_EMBEDDER, emb)
        return self._modules[self.TARGET_EMBEDDER]

    def time_embedding(self, t: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """The adaLN input of times t (B,) in [0, 1] (1 = clean), in the embedder's dtype.

        With a target time (TwinFlow; the same convention, B values or one): the embedding of the signed
        gap (target - t) * t_scale, weighted by |t - target|, is added:
        `t_embedder(t * s) + E((target - t) * s) * |t - target|`, E being `t_embedder_2` when the checkpoint
        has one (TwinFlow's reference model), else `t_embedder` itself (Wan2GP's TwinFlow model). The gap and
        the weight are float32; the sum is float32 when the embedder's dtype is lower (as in Wan2GP) and is
        cast by the caller. target None: exactly the plain embedding.
        """
        scale = self.config.t_scale
        emb = self.t_embedder(t * scale)
        if target is None:
            return emb
        t32 = t.float()
        tgt = target.to(device=t32.device, dtype=torch.float32).expand_as(t32)
        embedder = self._modules[self.TARGET_EMBEDDER] if self.has_target_embedder else self.t_embedder
        return emb + embedder((tgt - t32) * scale) * (t32 - tgt).abs()[:, None]

    def set_attention_backend(self, name: str) -> None:
        """Use backend name (models.attention.BACKENDS, already resolved) in every attention module of this
        model; set before compiling (a compiled block keeps the backend it was traced with)."""
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = name

    @property
    def attention_backend(self) -> str:
        return next(m.backend for m in self.modules() if isinstance(m, Attention))

    def _embed_captions(self, caps: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        lens = [c.shape[0] for c in caps]
        target = pad_len(lens[0])
        if any(pad_len(n) != target for n in lens):
            raise ValueError("captions of one forward call must pad to the same length; run them separately")
        emb = self.cap_embedder(torch.cat(caps).to(dtype)).split(lens)
        pad = self.cap_pad_token.to(dtype)
        return torch.stack([torch.cat([e, pad.expand(target - n, -1)]) for e, n in zip(emb, lens)])

    def forward(self, x: torch.Tensor, t: torch.Tensor, caps: list[torch.Tensor],
                nag: NagGuidance | None = None, target: torch.Tensor | None = None,
                control: ControlHook | None = None) -> torch.Tensor:
        """x: (B, C, H, W) latents; t: (B,) in [0, 1] (1 = clean); caps: B tensors (L_i, cap_feat_dim).
        nag: Normalized Attention Guidance with B negative captions (models.z_image.nag).
        target: TwinFlow's target time, same convention as t (see `time_embedding`); None: the plain model.
        control: a ControlNet (models.z_image.controlnet.ControlInput): it gives the sequence the main layers
        start from (2.x: refined with its refiner hints) and hints added to the main layers' outputs.

        Returns the model output (B, C, H, W) in x's dtype (the pipeline negates it).
        """
        b, c, h, w = x.shape
        p = self.patch
        ht, wt = h // p, w // p
        n_img = ht * wt
        dtype = x.dtype
        adaln = self.time_embedding(t, target).to(dtype)

        tokens = x.view(b, c, ht, p, wt, p).permute(0, 2, 4, 3, 5, 1).reshape(b, n_img, p * p * c)
        img = self.all_x_embedder[self._key](tokens)
        n_pad = pad_len(n_img) - n_img
        if n_pad:
            img = torch.cat([img, self.x_pad_token.to(dtype).expand(b, n_pad, -1)], dim=1)

        cap = self._embed_captions(caps, dtype)
        rope = self.rope.for_shape(cap.shape[1], ht, wt, x.device)

        img_embedded = img  # the ControlNet's refiner pass (v2.x) starts from the embedded tokens
        if control is None or not control.refines_image:  # else its hinted pass replaces this one
            for block in self.noise_refiner:
                img = block(img, rope["img"], adaln)
        for block in self.context_refiner:
            cap = block(cap, rope["cap"])

        if nag is not None and control is not None:
            raise ValueError("NAG and a ControlNet cannot be combined")
        if nag is not None:
            if len(nag.neg_caps) != b:
                raise ValueError(f"NAG needs one negative caption per batch item ({b}), got {len(nag.neg_caps)}")
            neg = self._embed_captions(nag.neg_caps, dtype)
            rope_neg = self.rope.for_shape(neg.shape[1], ht, wt, x.device)
            for block in self.context_refiner:
                neg = block(neg, rope_neg["cap"])
            # the parameters as tensors: compiled blocks take other values without recompiling
            scale, tau, alpha = (torch.tensor(float(v), device=x.device) for v in (nag.scale, nag.tau, nag.alpha))
            layer_nag = NagLayer(img.shape[1], cap.shape[1], rope_neg["all"], scale, tau, alpha)
            seq = torch.cat([img, cap, neg], dim=1)
            for block in self.layers:
                seq = block(seq, rope["all"], adaln, layer_nag)
        else:
            seq = torch.cat([img, cap], dim=1)
            hints = {}
            if control is not None:
                seq, hints = control.apply(self, img_embedded, cap, seq, adaln, rope)
            for i, block in enumerate(self.layers):
                seq = block(seq, rope["all"], adaln)
                if i in hints:
                    seq = seq + hints[i]
        out = self.all_final_layer[self._key](seq[:, :n_img], adaln)
        return out.view(b, ht, wt, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


def _mark_sequence_dynamic(forward):
    """forward with the sequence dimension of its inputs marked dynamic before each call."""

    def marked(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], *args):
        torch._dynamo.maybe_mark_dynamic(x, 1)
        for table in rope:
            torch._dynamo.maybe_mark_dynamic(table, 1)
        return forward(x, rope, *args)

    return marked


def _mark_control_dynamic(forward):
    """A ControlNet block's forward (control tokens c, the stream x it reads, rope, adaln) with the sequence
    dimension of c, x and the rope tables marked dynamic before each call."""

    def marked(c: torch.Tensor, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], *args):
        torch._dynamo.maybe_mark_dynamic(c, 1)
        torch._dynamo.maybe_mark_dynamic(x, 1)
        for table in rope:
            torch._dynamo.maybe_mark_dynamic(table, 1)
        return forward(c, x, rope, *args)

    return marked


def compile_blocks(model: ZImageTransformer, backend: str = "inductor", mode: str | None = None) -> int:
    """Regional torch.compile: each repeated block is compiled once and its code shared.

    The sequence dimension is dynamic from the first call, so a new prompt length (a caption
    padded to another multiple of 32) or resolution reuses the compiled code instead of
    recompiling; nothing is padded further to get there, since pad tokens change the image.
    The block's `forward` is compiled, not its `__call__`: hooks on the block itself (mmgp's
    loading of streamed blocks) stay outside the graph, while the LoRA hooks of the Linear layers
    inside are traced. Compiled blocks say so (`is_compiled_region`; app.offload then moves mmgp's
    wrappers off their inner layers). Returns the number of blocks compiled.

    Only the sequence dimension is marked dynamic; batch and widths specialize, which gives inductor
    static sizes to tune for (H200: 0.191 s per CFG step against 0.194 s with every dimension symbolic,
    whose duck sizing also tied a sequence length to an equal head width and recompiled for it).
    """
    # Two dynamo settings these blocks need, applied around each of their calls only (that is when
    # dynamo traces, guards and counts recompiles), not to the whole process:
    # - variants per block kind: batch 1 vs more (0/1 specialization), image-only vs full sequence,
    #   and CFG on/off; the default limit of 8 is too tight when several models share the code
    # - LoRAs are forward hooks on the blocks' Linear layers, added and removed after compiling: by
    #   default dynamo does not guard on hooks and would keep running the code traced without them
    limit = max(torch._dynamo.config.recompile_limit, 64)
    blocks = [*model.noise_refiner, *model.context_refiner, *model.layers]
    net = model.controlnet  # an attached ControlNet's blocks: (c, x, rope, adaln) for the control blocks
    control = [*net.control_layers, *(net.control_noise_refiner or [])] if net is not None else []
    for block in [*blocks, *control]:
        mark = _mark_control_dynamic if hasattr(block, "after_proj") else _mark_sequence_dynamic
        compiled = mark(torch.compile(block.forward, backend=backend, mode=mode, dynamic=None, fullgraph=True))
        # a patch object per block: it saves the values it replaces on itself
        block.forward = torch._dynamo.config.patch(recompile_limit=limit, skip_nnmodule_hook_guards=False)(compiled)
        block.is_compiled_region = True
    return len(blocks) + len(control)
