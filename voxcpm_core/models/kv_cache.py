"""Static key/value cache for the causal stacks: preallocated once, written in place, no per-step allocation."""

from __future__ import annotations

import torch
from torch import nn

from voxcpm_core.config import LMConfig


class LayerKVCache(nn.Module):
    """One attention layer's keys and values, ``[B, kv_heads, max_len, head_dim]`` each."""

    def __init__(
        self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device=None
    ):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, kv_heads, T, hd] at start_pos..start_pos+T-1; return the filled part [.., :start_pos+T, :]."""
        end = start_pos + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache overflow: position {end - 1} >= max_len {self.k.shape[2]}")
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache(nn.Module):
    """The caches of every layer of one stack; ``layers[i]`` belongs to decoder layer i."""

    def __init__(self, layers: list[LayerKVCache]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @classmethod
    def for_stack(
        cls, config: LMConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32, device=None
    ) -> KVCache:
        """A cache sized for the stack described by ``config`` (one entry per decoder layer)."""
        return cls(
            [
                LayerKVCache(batch, config.num_key_value_heads, max_len, config.head_dim, dtype, device)
                for _ in range(config.num_hidden_layers)
            ]
        )

    def reset(self) -> None:
        """Zero every entry (positions are given by ``start_pos``, so this is only hygiene between uses)."""
        for layer in self.layers:
            layer.k.zero_()
            layer.v.zero_()
