"""The MiniCPM4 block stack used by every transformer in VoxCPM (base LM, residual LM, local encoder, local DiT).

RMSNorm with a float32 variance, LongRoPE, grouped-query attention, SwiGLU MLP, muP residual scaling.
Attribute names follow the official checkpoints (``layers.{i}.self_attn.q_proj`` ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from voxcpm_core.config import LMConfig
from voxcpm_core.models.kv_cache import KVCache, LayerKVCache


class _RMSNormFunction(torch.autograd.Function):
    """x / rms(x) * weight, statistics in float32; keeps only x and 1/rms for backward (autograd would keep 2 more)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)  # [..., 1] float32
        ctx.save_for_backward(x, weight, rstd)
        return (x.float() * rstd).to(x.dtype) * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        x_hat = x.float() * rstd  # [..., H]
        g = grad.float() * weight.float()
        grad_x = rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
        grad_w = (grad.float() * x_hat).flatten(0, -2).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x.to(x.dtype), grad_w, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class LongRoPE(nn.Module):
    """LongRoPE cos/sin tables [max_positions, head_dim] (non-persistent: they follow ``.to(dtype)`` but are never saved)."""

    def __init__(self, config: LMConfig):
        super().__init__()
        dim, max_pos = config.head_dim, config.max_position_embeddings
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # [dim/2]
        scaling = config.rope_scaling
        factor, scale = [1.0] * (dim // 2), 1.0
        if scaling is not None:
            orig = scaling.original_max_position_embeddings
            factor = scaling.long_factor if max_pos > orig else scaling.short_factor
            if max_pos > orig:
                scale = math.sqrt(1 + math.log(max_pos / orig) / math.log(orig))
        ext = torch.tensor(factor, dtype=torch.float32)
        positions = torch.arange(max_pos, dtype=torch.float32)
        freqs = torch.outer(positions, 1.0 / ext) * inv_freq  # [max_pos, dim/2], float32 as the reference
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_pos, dim]
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        self.register_buffer("sin", emb.sin() * scale, persistent=False)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, hd], cos/sin [T, hd]; rotated in float32, returned in x's dtype."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def causal_mask(T: int, S: int, device) -> torch.Tensor:
    """[T, S] bool: the queries are the last T of S positions, query i sees keys 0..S-T+i."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def small_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v over a few keys as batched matmuls, softmax in float32.

    q [B, nh, T, hd], k/v [B, nkv, S, hd], mask [T, S] bool (True = may attend) or None -> [B, nh, T, hd].
    Grouped-query heads share their key/value head without copies. Over few keys this beats SDPA's CPU
    kernels; ``voxcpm_core.cpu.kernels`` decides up to how many (``Attention.small_attention_keys``).
    """
    B, nh, T, hd = q.shape
    nkv, S = k.shape[1], k.shape[2]
    q = q.reshape(B, nkv, nh // nkv * T, hd)  # query heads grouped by the key/value head they read
    scores = (q @ k.transpose(-1, -2)).float() * hd**-0.5  # [B, nkv, nh/nkv*T, S]
    if mask is not None:
        scores = scores.view(B, nkv, nh // nkv, T, S).masked_fill(~mask, float("-inf")).view_as(scores)
    return (scores.softmax(-1).to(v.dtype) @ v).view(B, nh, T, hd)


class Attention(nn.Module):
    # up to this many keys attention runs as small_attention; 0: always SDPA (set by cpu.kernels.use_cpu_kernels)
    small_attention_keys: int = 0

    def __init__(self, config: LMConfig, causal: bool):
        super().__init__()
        self.causal = causal
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # [B, L, H]
        rope: tuple[torch.Tensor, torch.Tensor] | None,  # cos, sin [L, hd] for positions start_pos..
        cache: LayerKVCache | None,
        start_pos: int,
        queries: slice | None = None,  # positions that query (default all): the output is [B, len, H]
    ) -> torch.Tensor:
        B, L, _ = x.shape
        xq = x if queries is None else x[:, queries]
        T = xq.shape[1]
        q = self.q_proj(xq).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, nh, T, hd]
        k = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, nkv, L, hd]
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, nkv, L, hd]
        if rope is not None:
            cos, sin = rope  # [L, hd]
            q = apply_rope(q, cos, sin) if queries is None else apply_rope(q, cos[queries], sin[queries])
            k = apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)  # [B, nkv, start_pos+L, hd]
        S = k.shape[2]
        causal = self.causal and T > 1
        if S <= self.small_attention_keys:
            out = small_attention(q, k, v, causal_mask(T, S, x.device) if causal else None)
        elif causal and S == T:  # SDPA's own causal path, no mask tensor
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            mask = causal_mask(T, S, x.device) if causal else None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block; each residual branch is scaled by ``config.residual_scale`` (muP depth scaling)."""

    def __init__(self, config: LMConfig, causal: bool):
        super().__init__()
        self.residual_scale = config.residual_scale
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, causal)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, rope, cache: LayerKVCache | None, start_pos: int, outputs: slice | None = None) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H], or only the ``outputs`` positions (their queries and MLP; keys from all)."""
        attn = self.self_attn(self.input_layernorm(x), rope, cache, start_pos, outputs)
        x = x if outputs is None else x[:, outputs]
        h = torch.add(x, attn, alpha=self.residual_scale)  # x + scale * attn in one pass
        return torch.add(h, self.mlp(self.post_attention_layernorm(h)), alpha=self.residual_scale)


class MiniCPMModel(nn.Module):
    """Optional token embedding (only when ``vocab_size > 0``), decoder layers, final norm.

    ``forward`` takes embeddings, never ids: callers embed (and scale) tokens themselves.
    With ``gradient_checkpointing`` each layer keeps only its input and recomputes the rest in backward.
    """

    def __init__(self, config: LMConfig, causal: bool):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        if config.vocab_size > 0:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, causal) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope_emb = None if config.no_rope else LongRoPE(config)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        outputs: slice | None = None,
    ) -> torch.Tensor:
        """inputs_embeds [B, T, H] at positions start_pos..start_pos+T-1 -> hidden [B, T, H] (after the final norm).

        With ``kv_cache`` the keys/values are written at those positions and attention covers
        positions 0..start_pos+T-1; without it the sequence is attended on its own (start_pos only shifts RoPE).
        ``outputs`` (bidirectional stacks) names the positions the caller reads: -> [B, len, H], and the
        last layer computes queries, MLP and norm for those positions only.
        """
        if outputs is not None and (self.layers[0].self_attn.causal or kv_cache is not None):
            raise ValueError("outputs= is for bidirectional stacks without a KV cache")
        T = inputs_embeds.shape[1]
        rope = None
        if self.rope_emb is not None:
            rope = (
                self.rope_emb.cos[start_pos : start_pos + T],
                self.rope_emb.sin[start_pos : start_pos + T],
            )
        h = inputs_embeds
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            cache = kv_cache.layers[i] if kv_cache is not None else None
            keep = outputs if i == len(self.layers) - 1 else None
            if recompute:
                h = checkpoint(layer, h, rope, cache, start_pos, keep, use_reentrant=False)
            else:
                h = layer(h, rope, cache, start_pos, keep)
        if outputs is not None and not self.layers:  # no last layer to select them
            h = h[:, outputs]
        return self.norm(h)
