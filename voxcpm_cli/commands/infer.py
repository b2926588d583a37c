"""`voxcpm infer`: speak a text with a model directory, optionally in the voice of a prompt recording."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from voxcpm_cli.options import CkptDir, Device, DeviceChoice, Dtype, DtypeChoice


def infer(
    ckpt_dir: CkptDir,
    text: Annotated[str, typer.Option("--text", help="The text to speak.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="WAV file to write (at the model's sample rate).")],
    prompt_audio: Annotated[
        Path | None, typer.Option(help="Recording of the voice to clone (any sample rate / channels); needs --prompt-text.")
    ] = None,
    prompt_text: Annotated[str | None, typer.Option(help="Transcript of --prompt-audio.")] = None,
    cfg_value: Annotated[float, typer.Option(help="Classifier-free guidance strength.")] = 2.0,
    inference_timesteps: Annotated[int, typer.Option(min=1, help="Flow-matching steps per patch.")] = 10,
    min_len: Annotated[int, typer.Option(min=0, help="Patches generated before the stop head may end the speech.")] = 2,
    max_len: Annotated[
        int, typer.Option(min=1, help="Most patches to generate (also capped at 6 per text token + 10).")
    ] = 4096,
    seed: Annotated[int | None, typer.Option(min=0, help="Random seed; one is drawn (and printed) when not given.")] = None,
    retry_badcase: Annotated[
        bool,
        typer.Option("--retry-badcase/--no-retry-badcase", help="Redo a run that never stopped, with seed+1 (3 tries)."),
    ] = True,
    device: Device = DeviceChoice.auto,
    dtype: Dtype = DtypeChoice.auto,
) -> None:
    """Synthesize TEXT into a WAV file; with --prompt-audio/--prompt-text, clone that voice."""
    from voxcpm_core.api import VoxCPM  # torch loads only when a command runs
    from voxcpm_core.audio import write_wav
    from voxcpm_core.inference import SamplingOptions, check_prompt_args, new_seed

    check_prompt_args(prompt_audio, prompt_text)  # fail before the slow model load
    options = SamplingOptions(cfg_value, inference_timesteps, min_len, max_len, retry_badcase)
    tts = VoxCPM.from_pretrained(
        ckpt_dir, device=device.value, dtype=None if dtype is DtypeChoice.auto else dtype.value
    )
    seed = new_seed() if seed is None else seed
    start = time.perf_counter()
    result = tts.synthesize(text, prompt_audio, prompt_text, seed, options)
    elapsed = time.perf_counter() - start
    write_wav(output, result.wav, result.sample_rate)
    duration = len(result.wav) / result.sample_rate
    retries = f" (bad case: {result.tries} tries, the last with seed {seed + result.tries - 1})" if result.tries > 1 else ""
    typer.echo(
        f"wrote {output}: {duration:.2f} s of audio at {result.sample_rate} Hz in {elapsed:.2f} s "
        f"(RTF {elapsed / duration:.2f}), seed {seed}{retries}"
    )
