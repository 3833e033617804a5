"""Prompt encoding against transformers' full Qwen3Model (diffusers' recipe), and the cache."""

import logging

import pytest
import torch
from transformers import AutoTokenizer, Qwen3Model

from models.z_image import checkpoints as ck
from models.z_image.text_encoder import EmbeddingCache


@pytest.fixture(scope="module")
def encoder(tiny_dir):
    files = ck.find_model_files(tiny_dir)
    return ck.load_text_encoder(files.text_encoder, files.text_encoder_config, files.tokenizer_dir,
                                torch.float32, torch.device("cpu"))


def diffusers_recipe(tiny_dir, prompts, max_len=512):
    """What diffusers' ZImagePipeline._encode_prompt computes: padded batch, hidden_states[-2], mask."""
    tok = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
    model = Qwen3Model.from_pretrained(tiny_dir / "text_encoder", dtype=torch.float32).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                     enable_thinking=True) for p in prompts]
    enc = tok(texts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    mask = enc.attention_mask.bool()
    with torch.no_grad():
        hs = model(input_ids=enc.input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    return [hs[i][mask[i]] for i in range(len(prompts))]


def test_matches_hidden_states_minus_two(tiny_dir, encoder):
    prompts = ["a red fox in the snow", "", "ünïcødé 猫 and emoji 🦊"]
    want = diffusers_recipe(tiny_dir, prompts)
    for p, w in zip(prompts, want):
        got = encoder.encode(p)
        assert got.shape == w.shape
        assert (got - w).abs().max() < 1e-5


def test_last_layer_not_built(encoder):
    assert len(encoder.model.layers) == 2  # the tiny Qwen3 has 3 layers; the last one is never run
    assert isinstance(encoder.model.norm, torch.nn.Identity)


def test_template(encoder):
    assert encoder.template("cat") == "<|im_start|>user\ncat<|im_end|>\n<|im_start|>assistant\n"


def test_truncation_warns_and_matches(tiny_dir, encoder, caplog):
    long_prompt = "x" * 700  # one token per byte with the tiny tokenizer
    assert encoder.token_count(long_prompt) > 512
    with caplog.at_level(logging.WARNING, logger="wgp_zimage"):
        got = encoder.encode(long_prompt)
    assert "truncated to 512" in caplog.text
    assert got.shape[0] == 512
    want = diffusers_recipe(tiny_dir, [long_prompt])[0]
    assert (got - want).abs().max() < 1e-5


def test_cache_avoids_reencoding(encoder):
    before = encoder.encode_calls
    a = encoder.encode("cached prompt")
    b = encoder.encode("cached prompt")
    assert encoder.encode_calls == before + 1
    assert a is b
    encoder.encode("cached prompt", max_length=8)  # another limit is another entry
    assert encoder.encode_calls == before + 2


def test_cache_is_bounded_lru():
    cache = EmbeddingCache(max_mb=1)  # room for 2 tensors of 400 KB
    t = [torch.zeros(100_000) for _ in range(3)]
    cache.put(("a",), t[0])
    cache.put(("b",), t[1])
    assert cache.get(("a",)) is t[0]  # "a" becomes most recent
    cache.put(("c",), t[2])
    assert cache.get(("b",)) is None and cache.get(("a",)) is t[0] and cache.get(("c",)) is t[2]
    cache.put(("huge",), torch.zeros(1_000_000))  # larger than the whole cache: not kept
    assert cache.get(("huge",)) is None and len(cache) == 2
