"""The audio VAE: waveform <-> latent frames (causal, weight-normalised convolutions, Snake activations).

Attribute names follow the official checkpoint (``audiovae.pth``): ``encoder.block.*``,
``encoder.fc_mu``, ``encoder.fc_logvar``, ``decoder.model.*``; every conv stores ``weight_g``,
``weight_v`` and ``bias``. The VAE always runs in float32. The V2 VAE (``audio_vae_v2.py``) is built from
these blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from voxcpm_core.config import AudioVAEConfig, AudioVAEConfigV2


def _weight_norm(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """w = g * v / ||v||, the norm taken over every dim but dim 0."""
    return v * (g / v.norm(dim=tuple(range(1, v.dim())), keepdim=True))


class _WeightNormed(nn.Module):
    """Holds ``weight_v`` [d0, d1, k], ``weight_g`` [d0, 1, 1] and an optional ``bias``."""

    def __init__(self, v_shape: tuple[int, int, int], bias_size: int, bias: bool):
        super().__init__()
        self.weight_g = nn.Parameter(torch.empty(v_shape[0], 1, 1))
        self.weight_v = nn.Parameter(torch.empty(v_shape))
        self.bias = nn.Parameter(torch.empty(bias_size)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        with torch.no_grad():
            self.weight_g.copy_(self.weight_v.norm(dim=(1, 2), keepdim=True))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @property
    def weight(self) -> torch.Tensor:
        return _weight_norm(self.weight_v, self.weight_g)


class WNConv1d(_WeightNormed):
    """Causal Conv1d: the input is left-padded with ``left_pad`` zeros (default ``2 * padding``), the conv
    itself pads nothing."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        padding: int = 0,
        bias: bool = True,
        left_pad: int | None = None,
    ):
        super().__init__((out_ch, in_ch // groups, kernel_size), out_ch, bias)
        self.stride, self.dilation, self.groups = stride, dilation, groups
        self.left_pad = 2 * padding if left_pad is None else left_pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, L] -> [B, C_out, L']
        x = F.pad(x, (self.left_pad, 0))
        return F.conv1d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class WNConvTranspose1d(_WeightNormed):
    """Causal ConvTranspose1d: a plain transposed conv whose output loses ``2p - o`` samples at the end.

    Weight-normalised over dim 0 of its weight, which is the INPUT channel: ``weight_v`` [C_in, C_out, k].
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int, stride: int, padding: int, output_padding: int
    ):
        super().__init__((in_ch, out_ch, kernel_size), out_ch, bias=True)
        self.stride, self.trim = stride, 2 * padding - output_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, T] -> [B, C_out, T * stride]
        y = F.conv_transpose1d(x, self.weight, self.bias, self.stride)
        return y[..., : y.shape[-1] - self.trim] if self.trim > 0 else y


class Snake(nn.Module):
    """x + sin(alpha x)^2 / (alpha + 1e-9), one alpha per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inv_alpha = (self.alpha + 1e-9).reciprocal()
        if torch.is_grad_enabled() and (x.requires_grad or self.alpha.requires_grad):
            return x + inv_alpha * torch.sin(self.alpha * x).pow(2)
        # inference: the same arithmetic in one buffer instead of five full-size temporaries
        return (self.alpha * x).sin_().square_().mul_(inv_alpha).add_(x)


class ResidualUnit(nn.Module):
    """x + conv1(snake(conv7_dilated(snake(x)))), lengths preserved by causal padding."""

    def __init__(self, dim: int, dilation: int, depthwise: bool):
        super().__init__()
        groups = dim if depthwise else 1
        self.block = nn.Sequential(
            Snake(dim),
            WNConv1d(dim, dim, kernel_size=7, dilation=dilation, padding=3 * dilation, groups=groups),
            Snake(dim),
            WNConv1d(dim, dim, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _residual_units(dim: int, depthwise: bool) -> list[nn.Module]:
    return [ResidualUnit(dim, dilation, depthwise) for dilation in (1, 3, 9)]


class EncoderBlock(nn.Module):
    """Three residual units at ``dim``, then a strided conv ``dim -> 2 dim`` (time / stride).

    The strided conv left-pads ``2 * ceil(stride / 2)`` zeros (V1) or, with ``pad_by_stride``, ``stride``
    zeros (V2); the two differ only for odd strides.
    """

    def __init__(self, dim: int, stride: int, depthwise: bool, pad_by_stride: bool = False):
        super().__init__()
        left_pad = stride if pad_by_stride else 2 * math.ceil(stride / 2)
        downsample = WNConv1d(dim, 2 * dim, kernel_size=2 * stride, stride=stride, left_pad=left_pad)
        self.block = nn.Sequential(*_residual_units(dim, depthwise), Snake(dim), downsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class NoiseBlock(nn.Module):
    """x + randn(B, 1, T) * conv1(x) (``use_noise_block``; off in the released models)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = WNConv1d(dim, dim, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape[0], 1, x.shape[-1], device=x.device, dtype=x.dtype)
        return x + noise * self.linear(x)


class DecoderBlock(nn.Module):
    """Snake, transposed conv ``in_dim -> out_dim`` (time * stride), [noise], three residual units."""

    def __init__(self, in_dim: int, out_dim: int, stride: int, depthwise: bool, noise: bool):
        super().__init__()
        upsample = WNConvTranspose1d(
            in_dim,
            out_dim,
            kernel_size=2 * stride,
            stride=stride,
            padding=math.ceil(stride / 2),
            output_padding=stride % 2,
        )
        self.block = nn.Sequential(
            Snake(in_dim),
            upsample,
            *([NoiseBlock(out_dim)] if noise else []),
            *_residual_units(out_dim, depthwise),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Encoder(nn.Module):
    """``pad_by_stride``: the V2 encoder's padding of each block's strided conv (see ``EncoderBlock``)."""

    def __init__(self, cfg: AudioVAEConfig | AudioVAEConfigV2, pad_by_stride: bool = False):
        super().__init__()
        dim = cfg.encoder_dim
        blocks: list[nn.Module] = [WNConv1d(1, dim, kernel_size=7, padding=3)]
        for stride in cfg.encoder_rates:
            blocks.append(EncoderBlock(dim, stride, cfg.depthwise, pad_by_stride))
            dim *= 2
        self.block = nn.Sequential(*blocks)
        self.fc_mu = WNConv1d(dim, cfg.latent_dim, kernel_size=3, padding=1)
        self.fc_logvar = WNConv1d(dim, cfg.latent_dim, kernel_size=3, padding=1)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:  # [B, 1, L] -> mu [B, D, L / hop]
        return self.fc_mu(self.block(wav))


class Decoder(nn.Module):
    def __init__(self, cfg: AudioVAEConfig | AudioVAEConfigV2):
        super().__init__()
        latent, dim = cfg.latent_dim, cfg.decoder_dim
        if cfg.depthwise:
            layers: list[nn.Module] = [
                WNConv1d(latent, latent, kernel_size=7, padding=3, groups=latent),
                WNConv1d(latent, dim, kernel_size=1),
            ]
        else:
            layers = [WNConv1d(latent, dim, kernel_size=7, padding=3)]
        for i, stride in enumerate(cfg.decoder_rates):
            in_dim, out_dim = dim // 2**i, dim // 2 ** (i + 1)
            layers.append(DecoderBlock(in_dim, out_dim, stride, cfg.depthwise, cfg.use_noise_block))
        layers += [Snake(out_dim), WNConv1d(out_dim, 1, kernel_size=7, padding=3), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, D, T] -> [B, 1, T * hop]
        return self.model(z)


class AudioVAE(nn.Module):
    """``encode`` waveforms to latent means and ``decode`` latents back, always in float32.

    ``encoder`` / ``decoder`` default to V1's; the V2 VAE passes its own.
    """

    def __init__(
        self,
        config: AudioVAEConfig | AudioVAEConfigV2,
        encoder: Encoder | None = None,
        decoder: Decoder | None = None,
    ):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config) if encoder is None else encoder
        self.decoder = Decoder(config) if decoder is None else decoder

    @property
    def sample_rate(self) -> int:
        """The encoder's input rate."""
        return self.config.sample_rate

    @property
    def out_sample_rate(self) -> int:
        """The decoder's output rate (V1: the input rate)."""
        return self.config.out_sample_rate

    @property
    def hop_length(self) -> int:
        """Encoder input samples per latent frame."""
        return self.config.hop_length

    @property
    def decode_hop_length(self) -> int:
        """Decoder output samples per latent frame."""
        return self.config.decode_hop_length

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [B, 1, L] -> mu [B, D, ceil(L / hop)]; the wave is right-padded with zeros to a hop multiple."""
        wav = wav.to(torch.float32)
        wav = F.pad(wav, (0, -wav.shape[-1] % self.hop_length))
        return self.encoder(wav)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D, T] -> waveform [B, 1, T * decode_hop_length] in [-1, 1]."""
        return self.decoder(z.to(torch.float32))
