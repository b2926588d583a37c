"""AudioVAE V2 (VoxCPM2): V1's blocks, encoding at ``sample_rate`` and decoding at ``out_sample_rate``
under a sample-rate condition.

Two changes from V1 (``audio_vae.py``): the strided conv closing each encoder block left-pads ``stride``
zeros, and before each decoder block a condition layer mixes in the bucket of the requested output rate.
Attribute names follow the official ``audiovae.pth``: ``decoder.sr_bin_boundaries`` (int32 buffer) and
``decoder.sr_cond_model.{i}`` with ``i`` the block's index in ``decoder.model``.
"""

from __future__ import annotations

import torch
from torch import nn

from voxcpm_core.config import AudioVAEConfigV2
from voxcpm_core.models.audio_vae import AudioVAE, Decoder, DecoderBlock, Encoder, Snake, WNConv1d


class SampleRateCondition(nn.Module):
    """One decoder block's condition: its input x [B, C, T] and a rate bucket per row [B] -> [B, C, T].

    "scale_bias" / "scale_bias_init": x * scale_embed[b] + bias_embed[b] per channel ("_init" starts as the
    identity); "add": x + embed[b]; "concat": [x, embed[b] over T] along channels, which ``out_layer``
    (Snake, 1x1 conv) maps back to C. The condition is per channel and constant over time, so it adds
    no receptive field to the causal decoder.
    """

    def __init__(self, channels: int, n_buckets: int, cond_type: str, cond_dim: int, out_layer: bool):
        super().__init__()
        self.cond_type = cond_type
        width = channels
        if cond_type in ("scale_bias", "scale_bias_init"):
            self.scale_embed = nn.Embedding(n_buckets, channels)
            self.bias_embed = nn.Embedding(n_buckets, channels)
            if cond_type == "scale_bias_init":
                nn.init.ones_(self.scale_embed.weight)
                nn.init.zeros_(self.bias_embed.weight)
        elif cond_type == "add":
            self.embed = nn.Embedding(n_buckets, channels)
        else:  # "concat"
            self.embed = nn.Embedding(n_buckets, cond_dim)
            width = channels + cond_dim
        self.out_layer = (
            nn.Sequential(Snake(width), WNConv1d(width, channels, kernel_size=1)) if out_layer else None
        )

    def forward(self, x: torch.Tensor, bucket: torch.Tensor) -> torch.Tensor:  # [B, C, T], [B] -> [B, C, T]
        if self.cond_type in ("scale_bias", "scale_bias_init"):
            scale, bias = self.scale_embed(bucket)[..., None], self.bias_embed(bucket)[..., None]  # [B, C, 1]
            x = x * scale + bias  # per channel, broadcast over T
        elif self.cond_type == "add":
            x = x + self.embed(bucket)[..., None]
        else:
            embed = self.embed(bucket)[..., None].expand(-1, -1, x.shape[-1])  # [B, cond_dim, T]
            x = torch.cat([x, embed], dim=1)  # [B, C + cond_dim, T]
        return x if self.out_layer is None else self.out_layer(x)


class SampleRateDecoder(Decoder):
    """V1's decoder layers, each block's input first conditioned on the output rate's bucket.

    Without ``sr_bin_boundaries`` there is no condition and no buffer: the decoder is exactly V1's.
    """

    def __init__(self, cfg: AudioVAEConfigV2):
        super().__init__(cfg)
        self.out_sample_rate = cfg.out_sample_rate
        self.sr_cond_model: nn.ModuleDict | None = None
        if cfg.sr_bin_boundaries is None:
            return
        # persistent: the boundaries used are the checkpoint's; the config only sizes them
        self.register_buffer("sr_bin_boundaries", torch.tensor(cfg.sr_bin_boundaries, dtype=torch.int32))
        blocks = [i for i, layer in enumerate(self.model) if isinstance(layer, DecoderBlock)]
        self.sr_cond_model = nn.ModuleDict(
            {
                str(i): SampleRateCondition(
                    cfg.decoder_dim // 2**k,  # the block's input channels
                    len(cfg.sr_bin_boundaries) + 1,
                    cfg.cond_type,
                    cfg.cond_dim,
                    cfg.cond_out_layer,
                )
                for k, i in enumerate(blocks)
            }
        )

    def bucket(self, sr_cond: int | torch.Tensor | None, batch: int) -> torch.Tensor:
        """The rate bucket of each row [batch] (int64): how many boundaries lie strictly below its rate.

        ``sr_cond``: None (``out_sample_rate``), one rate for every row, or a tensor of rates [batch].
        A rate equal to a boundary falls in the lower bucket (bucketize with right=False, as the reference).
        """
        rate = torch.as_tensor(
            self.out_sample_rate if sr_cond is None else sr_cond, device=self.sr_bin_boundaries.device
        )
        bucket = torch.bucketize(rate, self.sr_bin_boundaries, right=False)
        if bucket.dim() == 0:
            return bucket.expand(batch)
        if bucket.shape != (batch,):
            raise ValueError(
                f"sr_cond has shape {tuple(bucket.shape)}; expected one rate or one per row ({batch},)"
            )
        return bucket

    def forward(self, z: torch.Tensor, sr_cond: int | torch.Tensor | None = None) -> torch.Tensor:
        """z [B, D, T] -> [B, 1, T * hop]; ``sr_cond`` as in ``bucket`` (ignored without a condition)."""
        if self.sr_cond_model is None:
            return self.model(z)
        bucket = self.bucket(sr_cond, z.shape[0])  # [B]
        x = z
        for i, layer in enumerate(self.model):
            if str(i) in self.sr_cond_model:
                x = self.sr_cond_model[str(i)](x, bucket)
            x = layer(x)
        return x


class AudioVAEV2(AudioVAE):
    """``encode`` waveforms at ``sample_rate``; ``decode`` at ``out_sample_rate`` (or under another rate's
    bucket through ``sr_cond``); always in float32."""

    def __init__(self, config: AudioVAEConfigV2):
        super().__init__(config, Encoder(config, pad_by_stride=True), SampleRateDecoder(config))

    def decode(self, z: torch.Tensor, sr_cond: int | torch.Tensor | None = None) -> torch.Tensor:
        """z [B, D, T] -> waveform [B, 1, T * decode_hop_length] in [-1, 1].

        ``sr_cond``: the output rate the decoder is conditioned on, one int or one per row [B];
        None means ``out_sample_rate``.
        """
        return self.decoder(z.to(torch.float32), sr_cond)
