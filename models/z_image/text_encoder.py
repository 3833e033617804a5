"""Qwen3 prompt encoder: chat template, 512-token limit, second-to-last hidden state.

Only the first L-1 decoder layers are built and loaded: the wanted tensor is the output of the
second-to-last layer (diffusers' `hidden_states[-2]`), so the last layer, the final norm and the
LM head are never needed. Each prompt runs alone and unpadded, which gives the real-token rows
diffusers keeps after masking.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
import torch.nn as nn

log = logging.getLogger("wgp_zimage")

MAX_SEQUENCE_LENGTH = 512


def truncated_config(config):
    """Copy of a Qwen3 config with the last decoder layer dropped."""
    cfg = config.__class__.from_dict(config.to_dict())
    cfg.num_hidden_layers = config.num_hidden_layers - 1
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[: cfg.num_hidden_layers]
    return cfg


class EmbeddingCache:
    """LRU cache of prompt embeddings, bounded in bytes."""

    def __init__(self, max_mb: float = 256):
        self.max_bytes = int(max_mb * 1024 * 1024)
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0

    def get(self, key: tuple) -> torch.Tensor | None:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key: tuple, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        if key in self._items:
            self._bytes -= self._nbytes(self._items.pop(key))
        self._items[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= self._nbytes(old)

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0

    @staticmethod
    def _nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def __len__(self) -> int:
        return len(self._items)


def chat_template(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )


def count_tokens(tokenizer, prompt: str) -> int:
    """Tokens the prompt takes, chat template included (may exceed the limit)."""
    return len(tokenizer(chat_template(tokenizer, prompt)).input_ids)


class PromptEncoder:
    """Turns prompts into variable-length (L, hidden) caption features."""

    def __init__(self, model: nn.Module, tokenizer, cache_mb: float = 256):
        self.model = model
        self.tokenizer = tokenizer
        self.cache = EmbeddingCache(cache_mb)
        self.encode_calls = 0  # model runs, for tests and stats

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def template(self, prompt: str) -> str:
        return chat_template(self.tokenizer, prompt)

    def token_count(self, prompt: str) -> int:
        return count_tokens(self.tokenizer, prompt)

    def token_ids(self, prompt: str, max_length: int = MAX_SEQUENCE_LENGTH) -> list[int]:
        ids = self.tokenizer(self.template(prompt)).input_ids
        if len(ids) > max_length:
            log.warning("prompt is %d tokens (chat template included); truncated to %d", len(ids), max_length)
            ids = ids[:max_length]
        return ids

    @torch.no_grad()
    def encode(
        self, prompt: str, max_length: int = MAX_SEQUENCE_LENGTH, device: torch.device | None = None
    ) -> torch.Tensor:
        key = (prompt, max_length)
        cached = self.cache.get(key)
        if cached is not None:
            return cached if device is None else cached.to(device)
        ids = torch.tensor([self.token_ids(prompt, max_length)], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, use_cache=False).last_hidden_state[0]
        self.encode_calls += 1
        self.cache.put(key, out)
        return out if device is None else out.to(device)
