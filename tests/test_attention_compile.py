"""Attention backend choice and regional compile (dynamic sequence length, no recompiles)."""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from models import attention
from models.z_image.tiny import TINY_TRANSFORMER
from models.z_image.transformer import ZImageConfig, ZImageTransformer, compile_blocks


def test_auto_picks_fastest_safe_installed():
    r = attention.resolve_backend
    assert r("auto", capability=None, installed=["sdpa", "flash", "sage"]) == "sdpa"  # CPU
    assert r("auto", capability=(8, 6), installed=["sdpa", "flash", "sage"]) == "flash"
    assert r("auto", capability=(9, 0), installed=["sdpa", "flash", "flash3"]) == "flash3"
    assert r("auto", capability=(9, 0), installed=["sdpa", "sage"]) == "sdpa"  # sage only on request
    assert r("auto", capability=(7, 5), installed=["sdpa", "flash"]) == "sdpa"


def test_model_rule_by_compute_capability():
    rules = {"<89": "sdpa"}
    assert attention.rule_backend(rules, (8, 6)) == "sdpa"
    assert attention.rule_backend(rules, (9, 0)) is None
    assert attention.resolve_backend("auto", rules, (8, 6), ["sdpa", "flash"]) == "sdpa"
    assert attention.resolve_backend("auto", rules, (9, 0), ["sdpa", "flash"]) == "flash"
    assert attention.rule_backend({">=90": "flash3"}, (9, 0)) == "flash3"
    with pytest.raises(ValueError, match="bad attention rule"):
        attention.rule_backend({"sm89": "sdpa"}, (8, 9))


def test_explicit_requests(caplog):
    with pytest.raises(ValueError, match="not installed"):
        attention.resolve_backend("flash", installed=["sdpa"])
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.resolve_backend("xformers", installed=["sdpa"])
    with caplog.at_level(logging.WARNING, logger="wgp_zimage"):
        assert attention.resolve_backend("sage", installed=["sdpa", "sage"]) == "sage"
    assert "corrupt" in caplog.text


def test_sdpa_matches_dense_float64():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 3, 8, generator=g, dtype=torch.float64) for _ in range(3))
    got = attention.attention(q, k, v)
    w = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5, dim=-1)
    want = torch.einsum("bhqk,bkhd->bqhd", w, v)
    assert torch.allclose(got, want, atol=1e-12)


def test_regional_compile_no_recompile_for_new_lengths():
    torch.manual_seed(0)
    model = ZImageTransformer(ZImageConfig.from_dict(TINY_TRANSFORMER)).eval()
    x, t = torch.randn(1, 16, 8, 8), torch.rand(1)
    caps = {n: torch.randn(n, 32, generator=torch.Generator().manual_seed(n)) for n in (7, 40, 100)}
    with torch.no_grad():
        eager = {n: model(x, t, [c]) for n, c in caps.items()}
        torch._dynamo.reset()
        counters.clear()
        assert compile_blocks(model, backend="aot_eager") == 4
        model(x, t, [caps[7]])
        graphs = counters["stats"]["unique_graphs"]
        for n, c in caps.items():  # other caption lengths: other padded sequence lengths
            assert torch.allclose(model(x, t, [c]), eager[n], atol=1e-5)
        model(torch.randn(1, 16, 16, 12), t, [caps[40]])  # another resolution
        assert counters["stats"]["unique_graphs"] == graphs
    # the blocks' dynamo settings apply around their calls, not to the whole process
    assert torch._dynamo.config.skip_nnmodule_hook_guards is True
    assert torch._dynamo.config.recompile_limit == 8
    torch._dynamo.reset()


def test_config_choices_match_the_dispatcher():
    """The UI's config lists the choices without importing torch; they must stay the dispatcher's."""
    from app.app_config import ATTENTION_CHOICES

    assert tuple(ATTENTION_CHOICES) == attention.CHOICES


@pytest.mark.parametrize("version", ["1.0", "2.1"])
def test_regional_compile_covers_an_attached_controlnet(tmp_path, version):
    """compile_blocks compiles the blocks of a ControlNet attached to the transformer (its control blocks take
    the stream they read as a second input), with the same results as eager and no recompile for a new
    caption length."""
    from models.z_image import controlnet as zc
    from models.z_image.tiny import write_tiny_controlnet
    from tests.test_controlnet_cli import write_net

    cfg = ZImageConfig.from_dict(TINY_TRANSFORMER)
    torch.manual_seed(0)
    model = ZImageTransformer(cfg).eval()
    path = write_net(tmp_path / "v1.safetensors", "1.0") if version == "1.0" else write_tiny_controlnet(
        tmp_path / "v21")
    net = zc.load_controlnet(path, cfg, torch.float32)
    model.controlnet = net
    x, t = torch.randn(1, 16, 8, 8), torch.rand(1)
    ctrl = torch.randn(1, net.in_dim, 8, 8)
    caps = {n: torch.randn(n, 32, generator=torch.Generator().manual_seed(n)) for n in (7, 40)}
    control = zc.ControlInput(net, ctrl, torch.tensor(0.8))
    with torch.no_grad():
        eager = {n: model(x, t, [c], control=control) for n, c in caps.items()}
        plain = model(x, t, [caps[7]])
        torch._dynamo.reset()
        counters.clear()
        own = len(net.control_layers) + len(net.control_noise_refiner or [])
        assert compile_blocks(model, backend="aot_eager") == 4 + own
        assert all(getattr(b, "is_compiled_region", False) for b in net.control_layers)
        model(x, t, [caps[7]], control=control)
        graphs = counters["stats"]["unique_graphs"]
        for n, c in caps.items():
            assert torch.allclose(model(x, t, [c], control=control), eager[n], atol=1e-5)
        assert counters["stats"]["unique_graphs"] == graphs
        assert not torch.allclose(eager[7], plain, atol=1e-3)  # the ControlNet is in the result
    torch._dynamo.reset()
