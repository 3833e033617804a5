"""Z-Image LoRA files of every layout seen in the wild -> our transformer's module names.

Layouts (see shared/zimage-facts.md): diffusers/peft (`transformer.` prefix, lora_A/B, .alpha),
ai-toolkit (`diffusion_model.`), kohya/musubi (`lora_unet_layers_0_attention_to_q.lora_down`),
ComfyUI names (fused `attention.qkv`, `attention.out`, `x_embedder`, `final_layer`), DiffSynth
(`.lora_A.default.weight`), dotted (`to.q.lora.down`), LyCORIS LoKr / LoHa, DoRA magnitudes,
`.diff` / `.diff_b` full deltas.

Module names are matched by flattening: lower-case, with every `.` and `-` turned into `_`, all
spellings of one layer become the same string (`layers.0.attention.to.q`, `layers_0_attention_to_q`,
`layers.0.attention.to_q`), which is then looked up in a table of Z-Image's Linear layers. That
avoids guessing where kohya's underscores were dots. Nothing here needs a model instance, so the
same conversion serves our runtime and, through `to_mmgp_state_dict`, mmgp's `preprocess_sd`.
"""

from __future__ import annotations

import re

import torch

from models.lora_runtime import ConvertedLora, ModuleDelta, dense_delta, low_rank_delta

__all__ = ["convert_state_dict", "dense_delta", "detect_format", "target_module", "to_mmgp_state_dict"]

QKV = "qkv"  # marker: a fused attention projection, split into to_q / to_k / to_v

# key suffix -> factor role; matched longest first
_ROLES = {
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora.A.weight": "down", ".lora.B.weight": "up",
    ".lora_magnitude_vector.default.weight": "magnitude", ".lora_magnitude_vector.weight": "magnitude",
    ".lora_magnitude_vector": "magnitude", ".dora_scale": "magnitude",
    ".alpha": "alpha",
    ".lokr_w1": "lokr_w1", ".lokr_w2": "lokr_w2", ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b", ".lokr_t2": "tucker",
    ".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a", ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "tucker", ".hada_t2": "tucker",
    ".diff": "diff", ".diff_b": "diff_b",
}
_SUFFIXES = sorted(_ROLES, key=len, reverse=True)
# prefixes trainers put before the module path (stripped repeatedly, in this order)
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_",
             "lycoris_", "lora_transformer_", "unet.")
_TEXT_ENCODER = ("lora_te", "text_encoder", "te_", "te1_", "te2_")


def _flat(name: str) -> str:
    return re.sub(r"[.\-]", "_", name).lower()


# block-relative layers (layers / noise_refiner / context_refiner), every spelling -> our name
_BLOCK_LAYERS = {
    **{_flat(f"attention.to_{p}"): f"attention.to_{p}" for p in "qkv"},
    _flat("attention.to_out.0"): "attention.to_out.0",
    _flat("attention.to_out"): "attention.to_out.0",
    _flat("attention.out"): "attention.to_out.0",  # ComfyUI / original
    _flat("attention.qkv"): QKV,  # ComfyUI / original, fused
    **{_flat(f"feed_forward.{w}"): f"feed_forward.{w}" for w in ("w1", "w2", "w3")},
    _flat("adaLN_modulation.0"): "adaLN_modulation.0",
}
_TOP_LAYERS = {
    _flat("all_x_embedder.2-1"): "all_x_embedder.2-1",
    _flat("x_embedder"): "all_x_embedder.2-1",
    _flat("all_final_layer.2-1.linear"): "all_final_layer.2-1.linear",
    _flat("final_layer.linear"): "all_final_layer.2-1.linear",
    _flat("all_final_layer.2-1.adaLN_modulation.1"): "all_final_layer.2-1.adaLN_modulation.1",
    _flat("final_layer.adaLN_modulation.1"): "all_final_layer.2-1.adaLN_modulation.1",
    _flat("t_embedder.mlp.0"): "t_embedder.mlp.0",
    _flat("t_embedder.mlp.2"): "t_embedder.mlp.2",
    _flat("cap_embedder.1"): "cap_embedder.1",
}
_BLOCK = re.compile(r"(layers|noise_refiner|context_refiner)_(\d+)_(.+)")


def _strip(base: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if base.startswith(p):
                base, changed = base[len(p):], True
    return base


def target_module(base: str) -> tuple[str, str | None] | str:
    """A key's module part -> (our module name, None), (block name, QKV) or a reason string."""
    stripped = _strip(base)
    flat = _flat(stripped)
    if flat.startswith(_TEXT_ENCODER) or stripped.startswith(_TEXT_ENCODER):
        return "text encoder LoRA (only the transformer takes LoRAs)"
    if flat in _TOP_LAYERS:
        return _TOP_LAYERS[flat], None
    m = _BLOCK.fullmatch(flat)
    if m and m[3] in _BLOCK_LAYERS:
        block = f"{m[1]}.{int(m[2])}"
        local = _BLOCK_LAYERS[m[3]]
        return (block, QKV) if local == QKV else (f"{block}.{local}", None)
    return "no Z-Image transformer layer of this name"


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], _ROLES[suffix]
    return None


def detect_format(keys: list[str]) -> str:
    """A label for the report (informational: conversion does not depend on it)."""
    text = "\n".join(keys)
    fused = ".qkv." in text or "_qkv." in text
    if "lokr_" in text:
        label = "LyCORIS LoKr"
    elif "hada_" in text:
        label = "LyCORIS LoHa"
    elif "lora_unet_" in text:
        label = "kohya/musubi" + (" (fused qkv)" if fused else "")
    elif ".default.weight" in text:
        label = "DiffSynth/ModelScope"
    elif ".lora.down." in text or ".lora.up." in text:
        label = "dotted lora.down/up"
    elif "diffusion_model." in text:
        label = "ComfyUI" if fused else "ai-toolkit"
    elif "transformer." in text or "base_model.model." in text:
        label = "diffusers/peft"
    elif ".lora_A." in text or ".lora_down." in text:
        label = "unprefixed lora_A/B"
    else:
        label = "unknown"
    if "dora_scale" in text or "lora_magnitude_vector" in text:
        label += " + DoRA"
    return label


def _mat(t: torch.Tensor) -> torch.Tensor:
    """Factors as float32 matrices (1x1 conv-shaped kohya tensors squeezed)."""
    t = t.float()
    while t.ndim > 2 and t.shape[-1] == 1:
        t = t.squeeze(-1)
    return t


def _build(roles: dict[str, torch.Tensor], keys: tuple[str, ...]) -> ModuleDelta | str:
    """One module's tensors -> a ModuleDelta, or the reason it cannot be used."""
    if "tucker" in roles:
        return "Tucker-decomposed (conv) LyCORIS factors are not supported for Linear layers"
    alpha = float(roles["alpha"].float().flatten()[0]) if "alpha" in roles else None
    md = ModuleDelta(keys=keys)
    has_lora = "down" in roles or "up" in roles
    has_lokr = any(r.startswith("lokr") for r in roles)
    has_loha = any(r.startswith("hada") for r in roles)
    if has_lora + has_lokr + has_loha > 1:
        return "mixes LoRA, LoKr and LoHa factors on one layer"
    if has_lora:
        if "down" not in roles or "up" not in roles:
            return "lora down/A without its up/B partner (or the reverse)"
        md.down, md.up = _mat(roles["down"]), _mat(roles["up"])
        if md.up.shape[1] != md.down.shape[0]:
            return f"lora up {tuple(md.up.shape)} and down {tuple(md.down.shape)} ranks differ"
        md.scale = alpha / md.down.shape[0] if alpha is not None else 1.0  # rank = rows of down
    if has_lokr:
        w, dims = [], []
        for i in ("1", "2"):
            if f"lokr_w{i}" in roles:
                w.append(_mat(roles[f"lokr_w{i}"]))
            elif f"lokr_w{i}_a" in roles and f"lokr_w{i}_b" in roles:
                a, b = _mat(roles[f"lokr_w{i}_a"]), _mat(roles[f"lokr_w{i}_b"])
                w.append(a @ b)
                dims.append(b.shape[0])
            else:
                return f"LoKr factor w{i} missing"
        md.kron = (w[0], w[1])
        # LyCORIS: alpha / dim when a factor is decomposed, 1 when both are full matrices
        md.scale = alpha / dims[-1] if (alpha is not None and dims) else 1.0
    if has_loha:
        need = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if any(n not in roles for n in need):
            return "LoHa factors incomplete"
        w1a, w1b, w2a, w2b = (_mat(roles[n]) for n in need)
        scale = alpha / w1b.shape[0] if alpha is not None else 1.0
        md.dense = (w1a @ w1b) * (w2a @ w2b) * scale
    if "diff" in roles:
        d = _mat(roles["diff"])
        md.dense = d if md.dense is None else md.dense + d
    if "diff_b" in roles:
        md.bias = roles["diff_b"].float().flatten()
    if "magnitude" in roles:
        m = roles["magnitude"].float()
        # LyCORIS stores (out, 1) or (1, in); peft a flat (out,): norm per output row unless (1, in)
        md.magnitude_axis = 1 if (m.ndim == 2 and m.shape[0] == 1 and m.shape[1] != 1) else 0
        md.magnitude = m.flatten()
    if md.shape() is None and md.bias is None:
        return "alpha or DoRA magnitude without any weight factor"
    return md


def _split_qkv(md: ModuleDelta) -> list[ModuleDelta | None] | str:
    """A fused-qkv delta -> q, k, v deltas: rows 0..d, d..2d, 2d..3d of the dense delta."""
    out_dim = md.shape()[0] if md.shape() is not None else md.bias.numel()
    if out_dim % 3:
        return f"fused qkv delta with {out_dim} rows (not a multiple of 3)"
    if md.magnitude is not None and md.magnitude_axis == 1:
        return "a fused-qkv DoRA normalized per input column cannot be split"
    d = out_dim // 3
    rows = [slice(i * d, (i + 1) * d) for i in range(3)]
    parts: list[ModuleDelta | None] = []
    for r in rows:
        p = ModuleDelta(scale=md.scale, keys=md.keys, magnitude_axis=0)
        if md.up is not None:
            up = md.up[r]
            keep = up.abs().amax(dim=0) != 0  # block-diagonal musubi files: drop the other blocks' rank
            p.up, p.down = up[:, keep], md.down[keep]
            if not keep.any():
                p.up = p.down = None
        if md.kron is not None:
            a, b = md.kron
            if a.shape[0] % 3 == 0:  # rows of kron(a, b) come in blocks of b's rows
                p.kron = (a[r.start // b.shape[0]: r.stop // b.shape[0]], b)
            else:
                dense = md.scale * torch.kron(a, b)[r]
                p.dense = dense if p.dense is None else p.dense + dense
        if md.dense is not None:
            p.dense = md.dense[r] if p.dense is None else p.dense + md.dense[r]
        if md.bias is not None:
            p.bias = md.bias[r]
        if md.magnitude is not None:
            p.magnitude = md.magnitude[r]
            if p.up is None and p.kron is None and p.dense is None:  # DoRA still needs a (zero) delta
                p.dense = torch.zeros(d, md.shape()[1])
        empty = p.up is None and p.kron is None and p.dense is None and p.bias is None
        parts.append(None if empty else p)
    return parts


def convert_state_dict(sd: dict[str, torch.Tensor]) -> ConvertedLora:
    """A LoRA state dict of any supported layout -> deltas by our module name + unmatched keys."""
    unmatched: dict[str, str] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    group_keys: dict[str, list[str]] = {}
    for key, tensor in sd.items():
        split = _split_key(key)
        if split is None:
            unmatched[key] = "unknown tensor kind (not a LoRA/LoKr/LoHa/DoRA factor)"
            continue
        base, role = split
        base = _flat(_strip(base))  # spellings of one layer (`to.q`, `to_q`) share a group
        if role in groups.get(base, {}):
            unmatched[key] = f"second {role} tensor for the same layer"
            continue
        groups.setdefault(base, {})[role] = tensor
        group_keys.setdefault(base, []).append(key)

    deltas: dict[str, ModuleDelta] = {}
    owner: dict[str, str] = {}  # our module -> the group that set it (duplicate detection)
    # direct names first, fused/alias spellings last: those are redundant next to split keys
    order = sorted(groups, key=lambda b: (b.endswith("attention_qkv"), b.endswith("attention_out"), b))
    for base in order:
        keys = tuple(group_keys[base])
        target = target_module(base)
        if isinstance(target, str):
            unmatched.update({k: target for k in keys})
            continue
        md = _build(groups[base], keys)
        if isinstance(md, str):
            unmatched.update({k: md for k in keys})
            continue
        name, kind = target
        if kind == QKV:
            parts = _split_qkv(md)
            if isinstance(parts, str):
                unmatched.update({k: parts for k in keys})
                continue
            named = {f"{name}.attention.to_{p}": part for p, part in zip("qkv", parts) if part is not None}
        else:
            named = {name: md}
        clash = [n for n in named if n in deltas]
        if clash:  # e.g. Anime-Z files carry both `qkv` and `to_q/k/v` for the same layers
            unmatched.update({k: f"duplicate of {owner[clash[0]]} (already applied to {clash[0]})" for k in keys})
            continue
        for n, part in named.items():
            deltas[n], owner[n] = part, base
        if not named:
            unmatched.update({k: "all-zero delta" for k in keys})
    return ConvertedLora(deltas=deltas, unmatched=unmatched, total=len(sd), format=detect_format(list(sd)))


def to_mmgp_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`preprocess_sd` for mmgp's load_loras_into_model: any layout -> our names, keys mmgp reads.

    Low-rank factors stay factors (lora_A/lora_B + alpha = scale * rank); LoKr and LoHa become full
    `.diff` deltas; DoRA magnitudes become `.dora_scale`. Unmatched keys are dropped: report them
    with `convert_state_dict(sd).unmatched`.
    """
    out: dict[str, torch.Tensor] = {}
    for name, md in convert_state_dict(sd).deltas.items():
        if md.up is not None and md.kron is None and md.dense is None:
            out[f"{name}.lora_A.weight"] = md.down
            out[f"{name}.lora_B.weight"] = md.up
            out[f"{name}.alpha"] = torch.tensor(md.scale * md.down.shape[0])
        elif md.shape() is not None:
            out[f"{name}.diff"] = low_rank_delta(md)
        if md.bias is not None:
            out[f"{name}.diff_b"] = md.bias
        if md.magnitude is not None:
            m = md.magnitude
            out[f"{name}.dora_scale"] = m[:, None] if md.magnitude_axis == 0 else m[None, :]
    return out
