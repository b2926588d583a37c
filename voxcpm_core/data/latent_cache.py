"""The frozen VAE encodes each clip once; its patch latents live in an on-disk cache.

Layout under the cache root::

    <root>/<vae key>/<ab>/<audio sha256>.safetensors   {"latents": [A, P, D] float32}
    <root>/file-hashes/<sha1 of the path>.json          {size, mtime_ns, sha256}: skips re-hashing

The vae key hashes the VAE weights, its sample rate, hop and the patch size, so new weights (or a
different model family) never read stale latents. An entry depends only on the audio's bytes,
so the cache is shared by runs, resumes, ``--dry-run`` and manifests that list the same file.
Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from voxcpm_core.cpu.memory import reusing_freed_memory
from voxcpm_core.data.audio import audio_info, load_audio
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.io.atomic import atomic_write, atomic_write_text
from voxcpm_core.models.audio_vae import AudioVAE

ProgressFn = Callable[[int, int], None]  # (clips done, clips to do)
LATENTS_KEY = "latents"
_IO_THREADS = 4


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(module: torch.nn.Module) -> str:
    """Identity of a module's weights: names, dtypes, shapes and bytes of its state dict."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


class LatentCache:
    """Patch latents [A, P, D] of audio files, encoded by ``vae`` at its own sample rate."""

    def __init__(
        self,
        root: Path,
        vae: AudioVAE,
        patch_size: int,
        max_batch_seconds: float = 120.0,
        max_batch_clips: int | None = None,
    ):
        self.vae = vae
        self.device = next(vae.parameters()).device  # where the VAE encodes
        self.patch_size = patch_size
        self.patch_samples = vae.hop_length * patch_size  # waveform samples per LM position
        self.max_batch_samples = int(max_batch_seconds * vae.sample_rate)  # padded samples per VAE call
        if max_batch_clips is None:  # on CPU a batch is no faster per clip (bench/data.py) and B times larger
            max_batch_clips = 1 if self.device.type == "cpu" else 16
        self.max_batch_clips = max_batch_clips
        identity = f"{state_dict_sha256(vae)}|sr={vae.sample_rate}|hop={vae.hop_length}|patch={patch_size}"
        self.key = hashlib.sha256(identity.encode()).hexdigest()[:24]
        self.root = Path(root)
        self.entries_dir = self.root / self.key
        self.hashes_dir = self.root / "file-hashes"

    # -- keys ---------------------------------------------------------------------------------

    def audio_sha256(self, path: Path) -> str:
        """Content hash of ``path``; reuses the stored hash while size and mtime are unchanged."""
        path = Path(path).resolve()
        stat = path.stat()
        record = self.hashes_dir / f"{hashlib.sha1(str(path).encode()).hexdigest()}.json"
        try:
            known = json.loads(record.read_text())
            if known["size"] == stat.st_size and known["mtime_ns"] == stat.st_mtime_ns:
                return known["sha256"]
        except (OSError, ValueError, KeyError):
            pass
        sha = file_sha256(path)
        data = json.dumps(
            {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
        )
        atomic_write_text(record, data)
        return sha

    def entry_path(self, audio_sha: str) -> Path:
        return self.entries_dir / audio_sha[:2] / f"{audio_sha}.safetensors"

    # -- reading ------------------------------------------------------------------------------

    @staticmethod
    def load(entry: Path) -> torch.Tensor:
        """Latents [A, P, D] float32 of one cache entry."""
        return load_file(entry)[LATENTS_KEY]

    @staticmethod
    def describe(entry: Path) -> tuple[int, int]:
        """(A patches, audio samples at the VAE rate) from the entry's header, without reading the tensor."""
        with safe_open(entry, framework="pt") as f:
            return f.get_slice(LATENTS_KEY).get_shape()[0], int(f.metadata()["samples"])

    # -- filling ------------------------------------------------------------------------------

    def ensure(
        self, paths: Sequence[Path], progress: ProgressFn | None = None, rank: int = 0, world_size: int = 1
    ) -> list[Path]:
        """The cache entry of each audio file, encoding the missing ones.

        With ``world_size > 1`` this process encodes only its share of the missing clips (chosen by
        content hash); the caller must wait for the other ranks (a barrier) before reading all entries.
        """
        with ThreadPoolExecutor(_IO_THREADS) as pool:
            shas = list(pool.map(self.audio_sha256, paths))
        entries = [self.entry_path(sha) for sha in shas]
        todo: dict[Path, Path] = {}  # entry -> one audio file with that content
        for path, entry in zip(paths, entries, strict=True):
            if not entry.is_file():
                todo.setdefault(entry, Path(path))
        # A clip's rank follows from its hash, not from what is missing now: ranks never race.
        mine = [(e, p) for e, p in sorted(todo.items()) if int(e.stem[:8], 16) % world_size == rank]
        self._encode(mine, progress)
        return entries

    def _expected_samples(self, path: Path) -> int:
        info = audio_info(path)
        return math.ceil(info.frames * self.vae.sample_rate / info.sample_rate)

    def _plan(self, todo: list[tuple[Path, Path]]) -> list[list[tuple[Path, Path]]]:
        """Group clips of similar length (sorted) so each VAE call pads little."""
        with ThreadPoolExecutor(_IO_THREADS) as pool:
            lengths = list(pool.map(lambda item: self._expected_samples(item[1]), todo))
        order = sorted(range(len(todo)), key=lambda i: lengths[i])
        batches: list[list[tuple[Path, Path]]] = []
        for i in order:  # ascending, so clip i is the longest of the batch it joins
            last = batches[-1] if batches else []
            if (
                last
                and len(last) < self.max_batch_clips
                and (len(last) + 1) * lengths[i] <= self.max_batch_samples
            ):
                last.append(todo[i])
            else:
                batches.append([todo[i]])
        return batches

    def _encode(self, todo: list[tuple[Path, Path]], progress: ProgressFn | None) -> None:
        total = len(todo)
        if progress is not None:
            progress(0, total)
        if not todo:
            return
        batches = self._plan(todo)
        done = 0
        rate = self.vae.sample_rate
        with (
            reusing_freed_memory(self.device.type == "cpu"),  # faster VAE encoding: no page faults
            ThreadPoolExecutor(1) as prefetch,
            ThreadPoolExecutor(_IO_THREADS) as io,
        ):

            def load(batch: list[tuple[Path, Path]]) -> list[np.ndarray]:
                return list(io.map(lambda item: load_audio(item[1], rate), batch))

            pending = prefetch.submit(load, batches[0])
            for i, batch in enumerate(batches):
                wavs = pending.result()
                if i + 1 < len(batches):
                    pending = prefetch.submit(
                        load, batches[i + 1]
                    )  # decode the next batch while the VAE runs
                for (entry, audio), wav, latents in zip(batch, wavs, self.encode_waves(wavs), strict=True):
                    metadata = {"audio": str(audio), "samples": str(len(wav))}
                    atomic_write(
                        entry, lambda tmp, t=latents, m=metadata: save_file({LATENTS_KEY: t}, tmp, metadata=m)
                    )
                done += len(batch)
                if progress is not None:
                    progress(done, total)

    @torch.inference_mode()
    def encode_waves(self, wavs: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Mono waves at the VAE rate -> latents [A, P, D] each, in one VAE call.

        Each wave is right-padded with zeros to a multiple of hop*patch_size. The VAE is causal, so the
        extra zeros that line up a batch do not change a clip's own frames; they are cut off.
        """
        patches = [max(1, math.ceil(len(w) / self.patch_samples)) for w in wavs]
        batch = torch.zeros(len(wavs), 1, max(patches) * self.patch_samples)  # [B, 1, L]
        for row, wav in zip(batch, wavs, strict=True):
            row[0, : len(wav)] = torch.from_numpy(wav)
        mu = self.vae.encode(batch.to(self.device)).float().cpu()  # [B, D, L / hop]
        out = []
        for row, a in zip(mu, patches, strict=True):
            frames = row[:, : a * self.patch_size]  # [D, A*P]
            out.append(frames.T.reshape(a, self.patch_size, -1).contiguous())  # [A, P, D]
        return out


def check_cache_dir(root: Path) -> Path:
    """Create the cache root, with an error that says how to pick another one."""
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VoxCPMError(
            f"{root}: cannot create the latent cache ({exc.strerror}); set cache_dir: in the YAML or $VOXCPM_CACHE_DIR"
        ) from None
    return Path(root)
