"""LoRA files in every layout seen in the wild, built here from the tiny model's layer shapes.

Each builder writes the file's tensors in one real key layout and, independently of the code
under test, the dense weight change it must make to each of our layers (at strength 1). The
applied delta is measured on the hooked layers themselves: module(I) - base(I) = dW^T.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from app.loras import LoraLibrary, parse_lora_multipliers, trigger_words
from models.errors import UserError
from models.lora_runtime import LoraManager, parse_schedule, strength_at
from models.z_image import checkpoints as ck
from models.z_image.lora import convert_state_dict, dense_delta, target_module, to_mmgp_state_dict

Refs = dict[str, torch.Tensor]

# our layer names, one of each kind: attention, SwiGLU, adaLN, refiners, embedders, final layer
TARGETS = [
    "layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.attention.to_v", "layers.0.attention.to_out.0",
    "layers.1.feed_forward.w1", "layers.1.feed_forward.w2", "layers.1.feed_forward.w3",
    "layers.1.adaLN_modulation.0", "noise_refiner.0.attention.to_q", "noise_refiner.0.adaLN_modulation.0",
    "context_refiner.0.attention.to_v", "context_refiner.0.feed_forward.w2", "all_x_embedder.2-1",
    "all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1", "t_embedder.mlp.0", "t_embedder.mlp.2",
    "cap_embedder.1",
]
FUSED_BLOCKS = ["layers.0", "noise_refiner.0", "context_refiner.0"]
OTHERS = [t for t in TARGETS if ".attention.to_" not in t or not t.startswith(tuple(FUSED_BLOCKS))]
COMFY_NAMES = {"all_x_embedder.2-1": "x_embedder", "all_final_layer.2-1.linear": "final_layer.linear",
               "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1"}
RANK = 4


def flat(name: str) -> str:
    return name.replace(".", "_").replace("-", "_")


def comfy(name: str) -> str:
    return COMFY_NAMES.get(name, name.replace(".attention.to_out.0", ".attention.out"))


def dotted(name: str) -> str:
    return name.replace(".to_q", ".to.q").replace(".to_k", ".to.k").replace(".to_v", ".to.v")


def load_tiny_transformer(tiny_dir: Path, dtype: torch.dtype = torch.float32):
    t = tiny_dir / "transformer"
    return ck.load_transformer([t / "diffusion_pytorch_model.safetensors"], t / "config.json", dtype,
                               torch.device("cpu"))


class Maker:
    """Random factors of the right shapes, and their dense deltas computed plainly."""

    def __init__(self, model, seed: int):
        self.shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        # plain float weights (dequantized for quanto int8 layers): what DoRA normalizes
        self.weights = {n: (m.weight.dequantize() if hasattr(m.weight, "dequantize") else m.weight).detach().float()
                        for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen)

    def lora(self, out: int, inp: int, rank: int = RANK) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) whose product has entries ~0.3 / sqrt(in): about a third of the weights'."""
        return self.randn(rank, inp) / inp**0.5, self.randn(out, rank) * 0.3 / rank**0.5

    def magnitude(self, name: str, axis: int) -> torch.Tensor:
        w = self.weights[name]
        return w.norm(dim=1 - axis) * (1 + 0.2 * self.randn(w.shape[axis]))


def _split3(dense: torch.Tensor, block: str, refs: Refs) -> None:
    for p, part in zip("qkv", dense.chunk(3)):
        refs[f"{block}.attention.to_{p}"] = part


def make_plain(key: Callable[[str], str], down_s: str, up_s: str, alpha: str | None, names=TARGETS):
    """Builder for one-key-per-layer LoRA layouts; alpha on every other layer when alpha is set."""
    def build(mk: Maker) -> tuple[dict, Refs]:
        sd, refs = {}, {}
        for i, name in enumerate(names):
            out, inp = mk.shapes[name]
            down, up = mk.lora(out, inp)
            sd[key(name) + down_s], sd[key(name) + up_s] = down, up
            scale = 1.0
            if alpha is not None and i % 2 == 0:
                sd[key(name) + alpha] = torch.tensor(2.0)
                scale = 2.0 / RANK
            refs[name] = up @ down * scale
        return sd, refs
    return build


def build_musubi_qkv(mk: Maker) -> tuple[dict, Refs]:
    """musubi converted for ComfyUI: block-diagonal fused qkv (up 3d x 3r, down 3r x d) + alpha."""
    sd, refs = make_plain(lambda n: "lora_unet_" + flat(comfy(n)), ".lora_down.weight", ".lora_up.weight",
                          ".alpha", OTHERS)(mk)
    for block in FUSED_BLOCKS:
        d = mk.shapes[f"{block}.attention.to_q"][0]
        downs, ups = zip(*(mk.lora(d, d) for _ in range(3)))
        down, up = torch.cat(downs), torch.block_diag(*ups)
        key = "lora_unet_" + flat(block) + "_attention_qkv"
        sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"], sd[key + ".alpha"] = down, up, torch.tensor(6.0)
        _split3(up @ down * 6.0 / (3 * RANK), block, refs)
    return sd, refs


def build_comfy(mk: Maker) -> tuple[dict, Refs]:
    """ComfyUI-trained: `diffusion_model.` + original names, fused qkv with one shared down."""
    sd, refs = make_plain(lambda n: "diffusion_model." + comfy(n), ".lora_A.weight", ".lora_B.weight", None,
                          OTHERS)(mk)
    for block in FUSED_BLOCKS:
        d = mk.shapes[f"{block}.attention.to_q"][0]
        down, up = mk.lora(3 * d, d)
        sd[f"diffusion_model.{block}.attention.qkv.lora_A.weight"] = down
        sd[f"diffusion_model.{block}.attention.qkv.lora_B.weight"] = up
        _split3(up @ down, block, refs)
    return sd, refs


def _kron_dims(n: int) -> tuple[int, int]:
    a = max(k for k in range(1, int(n**0.5) + 1) if n % k == 0)
    return a, n // a


def build_lokr(decomposed: bool) -> Callable[[Maker], tuple[dict, Refs]]:
    """LyCORIS LoKr: full w1/w2 (scale 1 whatever alpha says), or w2 (or w1) as a product a@b
    (scale alpha / inner dim); plus a fused qkv layer (its split follows the dense rows)."""
    def build(mk: Maker) -> tuple[dict, Refs]:
        sd, refs = {}, {}
        for i, name in enumerate(OTHERS):
            (out, inp), key = mk.shapes[name], "lycoris_" + flat(name)
            (a1, b1), (a2, b2) = _kron_dims(out), _kron_dims(inp)
            w1, w2 = mk.randn(a1, a2) / a2**0.5, mk.randn(b1, b2) * 0.3 / b2**0.5
            sd[key + ".alpha"] = torch.tensor(3.0)
            scale = 1.0
            if decomposed and i % 2 == 0:
                w2a, w2b = mk.randn(b1, 2), mk.randn(2, b2) * 0.3 / (2 * b2) ** 0.5
                sd[key + ".lokr_w1"], sd[key + ".lokr_w2_a"], sd[key + ".lokr_w2_b"] = w1, w2a, w2b
                w2, scale = w2a @ w2b, 3.0 / 2
            elif decomposed:
                w1a, w1b = mk.randn(a1, 2), mk.randn(2, a2) / (2 * a2) ** 0.5
                sd[key + ".lokr_w1_a"], sd[key + ".lokr_w1_b"], sd[key + ".lokr_w2"] = w1a, w1b, w2
                w1, scale = w1a @ w1b, 3.0 / 2
            else:
                sd[key + ".lokr_w1"], sd[key + ".lokr_w2"] = w1, w2
            refs[name] = torch.kron(w1, w2) * scale
        d = mk.shapes["layers.0.attention.to_q"][0]
        # 3 rows of w1 split along kron blocks; 4 rows do not (the dense split path)
        w1 = mk.randn(3 if decomposed else 4, 4) / 2
        w2 = mk.randn(3 * d // w1.shape[0], d // 4) * 0.3 / (d // 4) ** 0.5
        sd["lycoris_layers_0_attention_qkv.lokr_w1"], sd["lycoris_layers_0_attention_qkv.lokr_w2"] = w1, w2
        _split3(torch.kron(w1, w2), "layers.0", refs)
        return sd, refs
    return build


def build_loha(mk: Maker) -> tuple[dict, Refs]:
    sd, refs = {}, {}
    for name in TARGETS:
        (out, inp), key = mk.shapes[name], "lycoris_" + flat(name)
        w1a, w1b = mk.randn(out, RANK), mk.randn(RANK, inp) / RANK**0.5
        w2a, w2b = mk.randn(out, RANK), mk.randn(RANK, inp) * 0.3 / (RANK * inp) ** 0.5
        sd.update({key + ".hada_w1_a": w1a, key + ".hada_w1_b": w1b, key + ".hada_w2_a": w2a,
                   key + ".hada_w2_b": w2b, key + ".alpha": torch.tensor(2.0)})
        refs[name] = (w1a @ w1b) * (w2a @ w2b) * 2.0 / RANK
    return sd, refs


def build_dora(peft: bool) -> Callable[[Maker], tuple[dict, Refs]]:
    """DoRA: W' = m (W + dW) / ||W + dW||, per output row; one kohya layer per input column."""
    def build(mk: Maker) -> tuple[dict, Refs]:
        if peft:
            key, down_s, up_s = (lambda n: "transformer." + n), ".lora_A.weight", ".lora_B.weight"
        else:
            key, down_s, up_s = (lambda n: "lora_unet_" + flat(n)), ".lora_down.weight", ".lora_up.weight"
        sd, refs = make_plain(key, down_s, up_s, None if peft else ".alpha")(mk)
        for i, name in enumerate(TARGETS):
            w, axis = mk.weights[name], 1 if (not peft and i == 3) else 0
            m = mk.magnitude(name, axis)
            if peft:
                sd[key(name) + ".lora_magnitude_vector"] = m
            else:
                sd[key(name) + ".dora_scale"] = m[:, None] if axis == 0 else m[None, :]
            total = w + refs[name]
            norm = total.norm(dim=1, keepdim=True) if axis == 0 else total.norm(dim=0, keepdim=True)
            refs[name] = total * (m[:, None] if axis == 0 else m[None, :]) / norm - w
        return sd, refs
    return build


def build_diff(mk: Maker) -> tuple[dict, Refs]:
    """Full-weight deltas (`.diff`), as some trainers and mmgp's own files store them."""
    sd, refs = {}, {}
    for name in TARGETS:
        out, inp = mk.shapes[name]
        refs[name] = sd[f"diffusion_model.{name}.diff"] = mk.randn(out, inp) * 0.3 / inp**0.5
    return sd, refs


FORMATS: dict[str, Callable[[Maker], tuple[dict, Refs]]] = {
    "diffusers_peft": make_plain(lambda n: "transformer." + n, ".lora_A.weight", ".lora_B.weight", ".alpha"),
    "ai_toolkit": make_plain(lambda n: "diffusion_model." + n, ".lora_A.weight", ".lora_B.weight", None),
    "kohya_musubi": make_plain(lambda n: "lora_unet_" + flat(n), ".lora_down.weight", ".lora_up.weight", ".alpha"),
    "musubi_comfy_qkv": build_musubi_qkv,
    "comfyui_trained": build_comfy,
    "diffsynth": make_plain(lambda n: n, ".lora_A.default.weight", ".lora_B.default.weight", None),
    "dotted": make_plain(dotted, ".lora.down.weight", ".lora.up.weight", ".alpha"),
    "lokr": build_lokr(False),
    "lokr_decomposed": build_lokr(True),
    "loha": build_loha,
    "dora_kohya": build_dora(False),
    "dora_peft": build_dora(True),
    "full_diff": build_diff,
}


def write_lora(folder: Path, fmt: str, model, seed: int = 0, name: str | None = None,
               metadata: dict | None = None) -> tuple[Path, Refs]:
    sd, refs = FORMATS[fmt](Maker(model, seed))
    path = folder / f"{name or fmt}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=metadata)
    return path, refs


def applied_delta(module: torch.nn.Linear) -> torch.Tensor:
    """dW as the hooked layer applies it: module(I) - (I W^T + b), transposed."""
    eye = torch.eye(module.in_features, dtype=module.weight.dtype)
    with torch.no_grad():
        return (module(eye) - F.linear(eye, module.weight, module.bias)).T.float()


@pytest.fixture(scope="module")
def transformer(tiny_dir):
    return load_tiny_transformer(tiny_dir)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_applied_delta_matches_dense_reference(fmt, transformer, tmp_path):
    path, refs = write_lora(tmp_path, fmt, transformer)
    manager = LoraManager(transformer, convert_state_dict, merge=False)  # the side branches (merges: test_lora_merge)
    (report,) = manager.sync({path: 1.0})
    try:
        assert report.unmatched == {} and report.applied == report.total, report.unmatched
        assert report.modules == len(refs)
        modules = dict(transformer.named_modules())
        for name, ref in refs.items():
            err = (applied_delta(modules[name]) - ref).abs().max().item()
            assert err <= 1e-5, f"{fmt} {name}: {err}"
            assert ref.abs().max() > 1e-3  # the check is not vacuous
        hooked = {n for n, m in modules.items() if m._forward_hooks}
        assert hooked == set(refs)
        # the dense delta function agrees, from the converted factors alone
        conv = convert_state_dict(load_file(path))
        for name, ref in refs.items():
            assert (dense_delta(conv.deltas[name], modules[name].weight) - ref).abs().max() <= 1e-5
    finally:
        manager.remove_all()
    assert not any(m._forward_hooks for m in transformer.modules())


@pytest.mark.parametrize("fmt", [f for f in FORMATS if not f.startswith("dora")])
def test_mmgp_preprocess_keeps_the_delta(fmt, transformer):
    sd, refs = FORMATS[fmt](Maker(transformer, 3))
    out = to_mmgp_state_dict(sd)
    for name, ref in refs.items():
        if f"{name}.diff" in out:
            dense = out[f"{name}.diff"]
        else:
            down, up = out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"]
            dense = up @ down * (out[f"{name}.alpha"].item() / down.shape[0])
        assert (dense - ref).abs().max() <= 1e-5, name


def test_bias_deltas(transformer, tmp_path):
    db = torch.linspace(-0.5, 0.5, 64)
    save_file({"diffusion_model.all_final_layer.2-1.linear.diff_b": db,
               "diffusion_model.layers.0.attention.qkv.diff_b": torch.arange(192.0)}, tmp_path / "b.safetensors")
    manager = LoraManager(transformer, convert_state_dict, merge=False)  # side branches: the bias stays the base's
    (report,) = manager.sync({tmp_path / "b.safetensors": 0.5})
    zeros = torch.zeros(1, 64)
    with torch.no_grad():
        lin = transformer.get_submodule("all_final_layer.2-1.linear")
        assert torch.allclose(lin(zeros) - lin.bias, 0.5 * db)
        k = transformer.get_submodule("layers.0.attention.to_k")  # no bias of its own: the delta adds one
        assert torch.allclose(k(zeros), 0.5 * torch.arange(64.0, 128.0))
    manager.remove_all()
    assert report.applied == 2 and report.modules == 4


def test_kohya_names_map_back_to_dotted_modules():
    cases = {
        "lora_unet_layers_0_feed_forward_w1": ("layers.0.feed_forward.w1", None),
        "lora_unet_all_x_embedder_2_1": ("all_x_embedder.2-1", None),
        "lora_unet_noise_refiner_1_adaLN_modulation_0": ("noise_refiner.1.adaLN_modulation.0", None),
        "lora_unet_context_refiner_0_attention_to_out_0": ("context_refiner.0.attention.to_out.0", None),
        "lora_unet_layers_29_attention_qkv": ("layers.29", "qkv"),
        "lora_unet_all_final_layer_2_1_adaLN_modulation_1": ("all_final_layer.2-1.adaLN_modulation.1", None),
        "lora_unet_t_embedder_mlp_2": ("t_embedder.mlp.2", None),
        "diffusion_model.layers.3.attention.out": ("layers.3.attention.to_out.0", None),
        "layers.12.attention.to.k": ("layers.12.attention.to_k", None),
        "base_model.model.transformer.cap_embedder.1": ("cap_embedder.1", None),
    }
    for key, want in cases.items():
        assert target_module(key) == want, key
    assert "text encoder" in target_module("lora_te1_text_model_encoder_layers_0_mlp_fc1")
    assert isinstance(target_module("lora_unet_layers_0_attention_norm_q"), str)


def test_unmatched_keys_are_reported(transformer, tmp_path, caplog):
    sd, _ = FORMATS["kohya_musubi"](Maker(transformer, 1))
    extra = {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_layers_7_attention_to_q.lora_down.weight": torch.zeros(4, 64),  # no layer 7 in the tiny model
        "lora_unet_layers_7_attention_to_q.lora_up.weight": torch.zeros(64, 4),
        "lora_unet_layers_0_attention_to_k.lora_down.weight": torch.zeros(4, 65),  # shape of another model
        "some_optimizer_state": torch.zeros(3),
    }
    sd = {k: v for k, v in sd.items() if "layers_0_attention_to_k" not in k} | extra
    sd["lora_unet_layers_0_attention_to_k.lora_up.weight"] = torch.zeros(64, 4)
    path = tmp_path / "partial.safetensors"
    save_file(sd, path)
    manager = LoraManager(transformer, convert_state_dict)
    with caplog.at_level(logging.WARNING, logger="wgp_zimage"):
        (report,) = manager.sync({path: 1.0})
    manager.remove_all()
    bad = set(extra) | {"lora_unet_layers_0_attention_to_k.lora_up.weight"}
    assert set(report.unmatched) == bad
    assert report.total == len(sd) and report.applied == len(sd) - len(bad)
    assert f"{report.applied} of {report.total} tensors applied" in report.summary
    assert "another model" in report.unmatched["lora_unet_layers_0_attention_to_k.lora_down.weight"]
    assert "text encoder" in report.unmatched["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]
    assert "not applied" in caplog.text and "some_optimizer_state" in caplog.text


def test_no_matching_key_and_corrupt_files_are_user_errors(transformer, tmp_path):
    manager = LoraManager(transformer, convert_state_dict)
    foreign = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}, foreign)
    with pytest.raises(UserError, match="none of its 2 tensors"):
        manager.sync({foreign: 1.0})
    corrupt = tmp_path / "broken.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(UserError, match="broken.safetensors"):
        manager.sync({corrupt: 1.0})
    truncated = tmp_path / "truncated.safetensors"
    good, _ = write_lora(tmp_path, "ai_toolkit", transformer)
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated.safetensors"):
        manager.sync({truncated: 1.0})
    assert not any(m._forward_hooks for m in transformer.modules())
    manager.sync({good: 1.0})  # the next job runs
    assert manager.reports[0].applied == manager.reports[0].total
    manager.remove_all()


def test_nan_or_inf_weights_are_refused_at_load_naming_the_tensors(transformer, tmp_path):
    manager = LoraManager(transformer, convert_state_dict)
    good, _ = write_lora(tmp_path, "ai_toolkit", transformer)
    sd = load_file(good)
    keys = sorted(sd)
    sd[keys[0]] = sd[keys[0]].clone().fill_(float("nan"))
    sd[keys[1]] = sd[keys[1]].clone()
    sd[keys[1]].view(-1)[0] = float("inf")
    broken = tmp_path / "broken.safetensors"
    save_file(sd, broken)
    with pytest.raises(UserError, match=r"broken\.safetensors holds NaN or infinite values in 2 tensor\(s\)") as e:
        manager.sync({broken: 1.0})
    assert keys[0] in str(e.value) and keys[1] in str(e.value) and str(tmp_path) not in str(e.value)
    assert not any(m._forward_hooks for m in transformer.modules())  # nothing was attached
    manager.sync({good: 1.0})
    assert manager.reports[0].applied == manager.reports[0].total
    manager.remove_all()


def test_no_match_says_why_when_keys_match_but_tensors_do_not(transformer, tmp_path):
    """A LoRA for this model's layers whose shapes do not fit, or a lone lora_A, said only "wrong model family or
    unknown format": the reason found for the tensors is given."""
    manager = LoraManager(transformer, convert_state_dict)
    layer = dict(transformer.named_modules())["layers.0.attention.to_q"]
    rows, cols = layer.out_features, layer.in_features
    key = "diffusion_model.layers.0.attention.to_q"
    narrow = tmp_path / "narrow.safetensors"
    save_file({f"{key}.lora_A.weight": torch.ones(4, cols - 1), f"{key}.lora_B.weight": torch.ones(rows, 4)}, narrow)
    with pytest.raises(UserError, match="none of its 2 tensors") as e:
        manager.sync({narrow: 1.0})
    assert f"lora_A.weight: shape ({rows}, {cols - 1}) does not fit layer ({rows}, {cols})" in str(e.value)
    lone = tmp_path / "lone.safetensors"
    save_file({f"{key}.lora_A.weight": torch.ones(4, cols), "other.lora_A.weight": torch.ones(4, cols)}, lone)
    with pytest.raises(UserError, match="none of its 2 tensors") as e:
        manager.sync({lone: 1.0})
    assert "without its up/B partner" in str(e.value)
    foreign = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_down_blocks_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_proj_in.lora_up.weight": torch.zeros(8, 4)}, foreign)
    with pytest.raises(UserError, match="none of its 2 tensors .*no Z-Image transformer layer of this name"):
        manager.sync({foreign: 1.0})
    assert not any(m._forward_hooks for m in transformer.modules())


@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.complex64])
def test_non_float_lora_tensors_are_refused_naming_them(transformer, tmp_path, dtype):
    manager = LoraManager(transformer, convert_state_dict)
    good, _ = write_lora(tmp_path, "ai_toolkit", transformer)
    sd = load_file(good)
    key = sorted(k for k in sd if sd[k].numel() > 1)[0]
    sd[key] = sd[key].to(dtype)
    odd = tmp_path / "odd.safetensors"
    save_file(sd, odd)
    with pytest.raises(UserError, match=rf"odd\.safetensors holds 1 tensor\(s\) of a type a LoRA cannot use: "
                                        rf"{key} \({str(dtype).removeprefix('torch.')}\)"):
        manager.sync({odd: 1.0})
    assert not any(m._forward_hooks for m in transformer.modules())
    sd = load_file(good)  # an integer alpha (a hyperparameter) is read as the number it is
    alphas = [k for k in sd if k.endswith(".alpha")] or [key.replace("lora_A.weight", "alpha")]
    sd[alphas[0]] = torch.tensor(4, dtype=torch.int64)
    save_file(sd, odd)
    manager.sync({odd: 1.0})
    manager.remove_all()


def test_strength_schedules():
    assert parse_schedule(0.8) == (0.8,)
    assert parse_schedule("1.0,0.8, 0.4") == (1.0, 0.8, 0.4)
    assert [strength_at((1.0, 0.8, 0.4), i, 6) for i in range(6)] == [1.0, 1.0, 0.8, 0.8, 0.4, 0.4]
    assert [strength_at((1.0, 0.5), i, 3) for i in range(3)] == [1.0, 1.0, 0.5]  # floor(i * m / n)
    assert [strength_at((1, 2, 3, 4, 5), i, 2) for i in range(2)] == [1, 3]
    for bad in ("x", "1,,2", "1;0.5", "nan", True):
        with pytest.raises(UserError):
            parse_schedule(bad)


def test_cli_multipliers_bind_by_name():
    got = parse_lora_multipliers("1.0 0.6,0.3", ["a", "b", "c"])
    assert got == {"a": (1.0,), "b": (0.6, 0.3), "c": (1.0,)}
    assert parse_lora_multipliers(None, ["a"]) == {"a": (1.0,)}
    with pytest.raises(UserError, match="3 entries for 2"):
        parse_lora_multipliers("1 1 1", ["a", "b"])


def test_trigger_words_from_metadata():
    meta = {"ss_tag_frequency": json.dumps({"10_set": {"zzstyle": 40, "red hair": 12, "smile": 12},
                                            "5_more": {"zzstyle": 5, "outdoors": 30}}),
            "modelspec.trigger_phrase": "zz style"}
    assert trigger_words(meta, max_tags=3) == ["zz style", "zzstyle", "outdoors"]
    assert trigger_words({"ss_tag_frequency": "not json"}) == []
    assert trigger_words({}) == []


def test_discovery_refresh_and_names(tmp_path, transformer):
    folder = tmp_path / "loras" / "z_image"
    (folder / "people" / "deep").mkdir(parents=True)
    meta = {"ss_tag_frequency": json.dumps({"d": {"alice": 9, "portrait": 3}})}
    write_lora(folder, "ai_toolkit", transformer, name="style")
    write_lora(folder / "people", "kohya_musubi", transformer, name="alice", metadata=meta)
    save_file({"x": torch.zeros(1)}, folder / "people" / "deep" / "bob.sft")
    (folder / "notes.txt").write_text("not a lora")
    (folder / "broken.safetensors").write_bytes(b"garbage")
    lib = LoraLibrary(folder)
    assert lib.names() == ["broken", "people/alice", "people/deep/bob", "style"]
    assert lib.get("people/alice").trigger_words == ["alice", "portrait"]
    assert lib.get("broken").error and lib.get("broken").trigger_words == []
    assert lib.resolve("people/deep/bob.sft") == folder / "people" / "deep" / "bob.sft"
    write_lora(folder, "diffsynth", transformer, name="late")
    assert "late" not in [i.name for i in lib.items]
    assert "late" in [i.name for i in lib.refresh()]
    assert LoraLibrary(tmp_path / "missing").names() == []


def test_refresh_skips_a_file_deleted_mid_scan(tmp_path, transformer, monkeypatch):
    folder = tmp_path / "loras"
    folder.mkdir()
    write_lora(folder, "ai_toolkit", transformer, name="kept")
    write_lora(folder, "ai_toolkit", transformer, name="gone")
    gone = folder / "gone.safetensors"
    real_is_file = Path.is_file

    def is_file_then_deleted(path):  # the file is there when looked at, deleted just after
        result = real_is_file(path)
        if path == gone:
            path.unlink()
        return result

    monkeypatch.setattr(Path, "is_file", is_file_then_deleted)
    assert [i.name for i in LoraLibrary(folder).refresh()] == ["kept"]
