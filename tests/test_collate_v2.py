"""VoxCPM2 training batches: the three row layouts of the official packer (plain, with a reference clip,
``is_prompt``), from the fixture's raw waveforms through our latent encoder and ``collate``."""

from __future__ import annotations

import pytest
import torch
from conftest import official_dir
from reference_data import reference_batch, reference_tensors

from voxcpm_core.data.collate import Item, collate
from voxcpm_core.data.latent_cache import LatentCache
from voxcpm_core.io.checkpoint import load_audio_vae, read_model_config

IS_PROMPT = {"plain": [False, False], "ref": [False, False], "prompt": [True, False]}


def _cut(row: torch.Tensor) -> torch.Tensor:
    """A collated row up to its first pad value (-100): the sample as given."""
    pad = (row == -100).nonzero()
    return row[: int(pad[0])] if len(pad) else row


@pytest.mark.parametrize("name", IS_PROMPT)
def test_collate_reproduces_the_official_packer(tmp_path, name):
    preset = official_dir("v2-tiny")
    config = read_model_config(preset / "base")
    cache = LatentCache(tmp_path, load_audio_vae(preset / "base", config), config.patch_size)
    ref = reference_tensors(preset)
    raw = lambda key: ref.get(f"train.{name}.raw.{key}")  # noqa: E731
    refs = raw("ref_audio_tokens")
    items = []
    for b, is_prompt in enumerate(IS_PROMPT[name]):
        wav = _cut(raw("audio_tokens")[b]).numpy()
        ref_wav = None if refs is None else _cut(refs[b]).numpy()
        ref_latents = cache.encode_waves([ref_wav])[0] if ref_wav is not None and len(ref_wav) else None
        ids = _cut(raw("text_tokens")[b]).tolist()
        items.append(Item(ids, cache.encode_waves([wav])[0], 0, ref_latents, is_prompt))
    batch, packed = collate(items), reference_batch(ref, f"train.{name}")
    for key in ("text_tokens", "text_mask", "audio_mask", "loss_mask", "labels"):
        assert torch.equal(getattr(batch, key).float(), getattr(packed, key).float()), key
    err = (batch.audio_feats - packed.audio_feats).abs().max() / packed.audio_feats.abs().max()
    assert err < 1e-5
    if name == "prompt":
        assert batch.loss_mask[0].sum() == 0 and batch.loss_mask[1].sum() > 0
    if name == "ref":  # the reference sits before the text; the loss falls on the target only
        assert batch.text_tokens[0, 0] == 103 and batch.audio_mask[0].sum() > batch.loss_mask[0].sum() > 0
