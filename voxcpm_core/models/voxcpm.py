"""VoxCPMModel: every non-VAE weight of VoxCPM with the official attribute names, and the training losses.

Data flow per position (section 5 of the architecture page):
text ids / audio patches -> base_lm (causal) -> FSQ at audio positions -> residual_lm (causal);
the outputs of the PREVIOUS position condition the LocDiT, which denoises the current patch.
Generation (the autoregressive loop) lives outside the model and uses the helpers below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from voxcpm_core.config import VoxCPMConfig
from voxcpm_core.models.batch import TrainBatch
from voxcpm_core.models.flow_matching import FlowDraws, UnifiedCFM
from voxcpm_core.models.fsq import ScalarQuantizer
from voxcpm_core.models.kv_cache import KVCache
from voxcpm_core.models.local_dit import LocalDiT
from voxcpm_core.models.local_encoder import LocalEncoder
from voxcpm_core.models.minicpm import MiniCPMModel


def shift_right(x: torch.Tensor) -> torch.Tensor:
    """[B, T, ...] -> the previous position's value at each position (zeros at position 0)."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)


def select_rows(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, T] -> indices [n] of its nonzero positions among the B*T flattened rows."""
    return mask.flatten().nonzero().squeeze(1)


def scatter_rows(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """values [k, ...] computed for ``rows`` [k] -> [n, ...], zeros in every other row."""
    return values.new_zeros(n, *values.shape[1:]).index_copy(0, rows, values)


def masked_means(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values, mask [B, ...] -> (overall masked mean [], per-sample masked means [B]); empty masks count 1."""
    weighted = (values * mask).flatten(1).sum(1)  # [B]
    counts = mask.flatten(1).sum(1)  # [B]
    return weighted.sum() / counts.sum().clamp(min=1), weighted / counts.clamp(min=1)


class VoxCPMModel(nn.Module):
    dit_class: type[LocalDiT] = LocalDiT

    def __init__(self, config: VoxCPMConfig):
        super().__init__()
        self.config = config
        lm, hidden = config.lm_config, config.lm_config.hidden_size
        enc_hidden, dit_hidden = config.encoder_config.hidden_dim, config.dit_config.hidden_dim
        self.base_lm = MiniCPMModel(lm, causal=True)
        self.residual_lm = MiniCPMModel(config.residual_lm_config, causal=True)
        self.feat_encoder = LocalEncoder(config.encoder_lm_config, config.feat_dim)
        self.feat_decoder = UnifiedCFM(
            self.dit_class(config.dit_lm_config, config.feat_dim), config.dit_config.cfm_config
        )
        self.fsq_layer = ScalarQuantizer(
            hidden, config.scalar_quantization_latent_dim, config.scalar_quantization_scale
        )
        self.enc_to_lm_proj = nn.Linear(enc_hidden, hidden)
        self.lm_to_dit_proj = nn.Linear(hidden, dit_hidden)
        self.res_to_dit_proj = nn.Linear(hidden, dit_hidden)
        self.stop_proj = nn.Linear(hidden, hidden)
        self.stop_head = nn.Linear(hidden, 2, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.enc_to_lm_proj.weight.dtype

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute every transformer layer's activations in backward: less memory, one more forward pass."""
        for module in self.modules():
            if isinstance(module, MiniCPMModel):
                module.gradient_checkpointing = enabled

    # ---- building blocks shared by training and generation -------------------------------------

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> [B, T, H], times scale_emb under muP."""
        lm = self.config.lm_config
        return self.base_lm.embed_tokens(ids) * (lm.scale_emb if lm.use_mup else 1.0)

    def encode_patches(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [B, T, P, D] -> LM input embeddings [B, T, H]."""
        return self.enc_to_lm_proj(self.feat_encoder(feats))

    def stop_logits(self, lm_h: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., 2]; class 1 = stop."""
        return self.stop_head(F.silu(self.stop_proj(lm_h)))

    def dit_condition(self, lm_h: torch.Tensor, res_h: torch.Tensor) -> torch.Tensor:
        """mu [..., H_dit] for the LocDiT from the (previous position's) base and residual LM outputs."""
        return self.lm_to_dit_proj(lm_h) + self.res_to_dit_proj(res_h)

    def residual_input(self, lm_h: torch.Tensor, e_feat: torch.Tensor) -> torch.Tensor:
        """The residual LM's input from lm_h and the (audio-masked) patch embeddings, each [..., H]: their sum."""
        return lm_h + e_feat

    def encode_sequence(
        self,
        text_tokens: torch.Tensor,  # [B, T] long
        audio_feats: torch.Tensor,  # [B, T, P, D]
        text_mask: torch.Tensor,  # [B, T]
        audio_mask: torch.Tensor,  # [B, T]
        base_cache: KVCache | None = None,
        residual_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-3 of a forward (the prefill at generation): -> (lm_h, res_h), each [B, T, H], unshifted.

        lm_h is the base LM output, FSQ'd at audio positions (0 where both masks are 0);
        res_h is the residual LM output. With caches, both stacks fill them from position 0.
        The local encoder runs on the audio positions only.
        """
        B, T, P, D = audio_feats.shape
        tm, am = text_mask[..., None].to(self.dtype), audio_mask[..., None].to(self.dtype)  # [B, T, 1]
        audio_rows = select_rows(audio_mask)  # [Na]
        feats = audio_feats.to(self.dtype).reshape(B * T, 1, P, D)[audio_rows]  # [Na, 1, P, D]
        e_feat = scatter_rows(self.encode_patches(feats)[:, 0], audio_rows, B * T).view(B, T, -1)  # [B, T, H]
        x = tm * self.embed_text(text_tokens) + am * e_feat
        h = self.base_lm(x, base_cache)
        lm_h = self.fsq_layer(h) * am + h * tm
        res_h = self.residual_lm(self.residual_input(lm_h, am * e_feat), residual_cache)
        return lm_h, res_h

    def decode_step(
        self, e: torch.Tensor, base_cache: KVCache, residual_cache: KVCache, start_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One generated patch's embedding e [B, 1, H] (from encode_patches) at start_pos -> (lm_h, res_h) [B, 1, H]."""
        lm_h = self.fsq_layer(self.base_lm(e, base_cache, start_pos))
        return lm_h, self.residual_lm(self.residual_input(lm_h, e), residual_cache, start_pos)

    # ---- training ------------------------------------------------------------------------------

    def forward(self, batch: TrainBatch, draws: FlowDraws | None = None) -> dict[str, torch.Tensor]:
        """Training losses: scalar "loss/diff", "loss/stop" and their per-sample masked means [B].

        ``draws`` (for all B*T rows) fixes the flow-matching randomness (tests); by default it is drawn
        from torch's global RNG in the reference order. The LocDiT runs on the loss_mask rows only.
        """
        feats = batch.audio_feats.to(self.dtype)
        B, T, P, D = feats.shape
        N = B * T
        lm_h, res_h = self.encode_sequence(batch.text_tokens, feats, batch.text_mask, batch.audio_mask)
        lm_h, res_h = shift_right(lm_h), shift_right(res_h)  # position i is conditioned on i-1
        if draws is None:
            draws = FlowDraws.draw(N, D, P, self.feat_decoder.config, device=feats.device)
        rows = select_rows(batch.loss_mask)  # [n] rows that carry the diffusion loss
        mu = self.dit_condition(lm_h.reshape(N, -1)[rows], res_h.reshape(N, -1)[rows])  # [n, H_dit]
        x1 = feats.reshape(N, P, D)[rows].transpose(1, 2)  # [n, D, P] target patches
        cond = shift_right(feats).reshape(N, P, D)[rows].transpose(1, 2)  # [n, D, P] previous patches
        errors = self.feat_decoder.frame_errors(x1, mu, cond, draws.select(rows))  # [n, P]
        frame_err = scatter_rows(errors, rows, N).view(B, T, P)
        frame_mask = batch.loss_mask.float()[:, :, None].expand(B, T, P)
        loss_diff, diff_per_sample = masked_means(frame_err, frame_mask)

        stop_ce = F.cross_entropy(
            self.stop_logits(lm_h).float().flatten(0, 1), batch.labels.long().flatten(), reduction="none"
        ).view(B, T)
        loss_stop, stop_per_sample = masked_means(stop_ce, batch.loss_mask.float())
        return {
            "loss/diff": loss_diff,
            "loss/stop": loss_stop,
            "loss/diff_per_sample": diff_per_sample,
            "loss/stop_per_sample": stop_per_sample,
        }
