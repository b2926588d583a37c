"""`voxcpm infer`: speak texts with a model directory, optionally continuing a prompt recording or in the
voice of a reference clip (VoxCPM2), optionally under one or several LoRA adapters (swapped in place: one model load for everything)."""

from __future__ import annotations

import time
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer

from voxcpm_cli.errors import flag_hints
from voxcpm_cli.options import Device, DeviceChoice, Dtype, DtypeChoice, training_lora_settings
from voxcpm_core.generation.options import MAX_PATCHES_EXTRA, MAX_PATCHES_PER_TOKEN, SamplingOptions

FLAGS = {  # engine parameter -> the option of this command that sets it (for error hints)
    "model": "--ckpt-dir",
    "base": "--ckpt-dir",
    "lora_config": "--config TRAIN.yaml",
    "device": "--device",
    "dtype": "--dtype",
    "prompt_wav_path": "--prompt-audio",
    "reference_wav_path": "--reference-audio",
    **{f.name: "--" + f.name.replace("_", "-") for f in fields(SamplingOptions)},
}


def infer(
    ckpt_dir: Annotated[
        Path | None,
        typer.Option(
            "--ckpt-dir",
            help="Model directory (config.json, model.safetensors, audiovae.pth, tokenizer); with --lora-ckpt "
            "the default is the adapter's base_model.",
        ),
    ] = None,
    text: Annotated[str | None, typer.Option("--text", help="The text to speak.")] = None,
    text_file: Annotated[
        Path | None,
        typer.Option("--text-file", help="Speak every non-blank line (0001.wav, ...); needs --output-dir."),
    ] = None,
    batch: Annotated[
        Path | None,
        typer.Option(
            "--batch",
            help='JSONL, one {"text", "prompt_audio", "prompt_text", "reference_audio", "id"} per line (only text '
            "required); needs --output-dir.",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="WAV file to write for --text (at the model's output rate: 48 kHz for VoxCPM2)."),
    ] = None,
    output_dir: Annotated[
        Path | None,
        typer.Option(
            "--output-dir",
            help="Folder for <id>.wav files; one subfolder per adapter with several --lora-ckpt.",
        ),
    ] = None,
    lora_ckpt: Annotated[
        list[Path] | None,
        typer.Option(
            "--lora-ckpt",
            metavar="DIR",
            help="LoRA checkpoint folder; repeat it to render every text under every adapter (hot-swapped).",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="Training YAML of the adapter: lora: gives its structure, pretrained_path the base.",
        ),
    ] = None,
    prompt_audio: Annotated[
        Path | None,
        typer.Option(
            help="Recording of the voice to clone (any sample rate / channels); needs --prompt-text."
        ),
    ] = None,
    prompt_text: Annotated[str | None, typer.Option(help="Transcript of --prompt-audio.")] = None,
    reference_audio: Annotated[
        Path | None,
        typer.Option(
            help="VoxCPM2: a clip of the voice to speak in (any rate / channels), no transcript needed; "
            "alone or with --prompt-audio/--prompt-text."
        ),
    ] = None,
    cfg_value: Annotated[float, typer.Option(help="Classifier-free guidance strength.")] = SamplingOptions.cfg_value,
    inference_timesteps: Annotated[
        int, typer.Option(min=1, help="Flow-matching steps per patch.")
    ] = SamplingOptions.inference_timesteps,
    min_len: Annotated[
        int, typer.Option(min=0, help="Patches generated before the stop head may end the speech.")
    ] = SamplingOptions.min_len,
    max_len: Annotated[
        int,
        typer.Option(
            min=1,
            help=f"Most patches to generate (also capped at {MAX_PATCHES_PER_TOKEN} per text token + {MAX_PATCHES_EXTRA}).",
        ),
    ] = SamplingOptions.max_len,
    seed: Annotated[
        int | None,
        typer.Option(min=0, help="Random seed (the same for every text); drawn and printed when not given."),
    ] = None,
    retry_badcase: Annotated[
        bool,
        typer.Option(
            "--retry-badcase/--no-retry-badcase",
            help=f"Redo a run that never stopped, with seed+1 ({SamplingOptions.retry_badcase_max_times} tries).",
        ),
    ] = SamplingOptions.retry_badcase,
    device: Device = DeviceChoice.auto,
    dtype: Dtype = DtypeChoice.auto,
    optimize: Annotated[
        bool | None,
        typer.Option(
            "--optimize/--no-optimize",
            help="CPU: prepack weights for oneDNN (faster, one more copy of the weights in memory); "
            "CUDA: torch.compile. Default: on for CPU, off for CUDA.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Synthesize speech into WAV files; with --prompt-audio/--prompt-text, continue that recording; with
    --reference-audio (VoxCPM2), speak in that voice. "(A warm, gentle voice)Hello." designs a voice.

    One text: --text ... --output out.wav. Many: --text-file or --batch with --output-dir (one model load).
    """
    from voxcpm_core.adapters import load_adapter  # torch loads only when a command runs
    from voxcpm_core.api import VoxCPM
    from voxcpm_core.generation.render import read_utterances, render
    from voxcpm_core.generation.sampling import new_seed

    paths = lora_ckpt or []
    _check_usage(
        text, text_file, batch, output, output_dir, paths, config, ckpt_dir, prompt_audio, prompt_text, reference_audio
    )
    with flag_hints(**FLAGS):
        # texts, prompts and adapters (each read and checked once, here) come before the (slow) model load
        utterances = read_utterances(text, text_file, batch, prompt_audio, prompt_text, output, reference_audio)
        lora_config, yaml_base = training_lora_settings(config) if config is not None else (None, None)
        adapters = [load_adapter(path, lora_config) for path in paths]
        options = SamplingOptions(cfg_value, inference_timesteps, min_len, max_len, retry_badcase)
        seed = new_seed() if seed is None else seed

        start = time.perf_counter()
        model = ckpt_dir if ckpt_dir is not None else yaml_base
        tts = VoxCPM.from_adapters(adapters, model, device.value, dtype.value, optimize)
        count = 0
        for done in render(tts, utterances, output_dir or Path("."), adapters, options, seed):
            count += 1
            retries = (
                f" (bad case: {done.tries} tries, the last with seed {seed + done.tries - 1})"
                if done.tries > 1
                else ""
            )
            typer.echo(
                f"wrote {done.path}: {done.seconds:.2f} s of audio at {tts.sample_rate} Hz in {done.elapsed:.2f} s "
                f"(RTF {done.elapsed / max(done.seconds, 1e-9):.2f}), seed {seed}{retries}"
            )
    if count > 1:
        grid = f" ({len(utterances)} texts x {len(adapters)} adapters)" if len(adapters) > 1 else ""
        typer.echo(
            f"rendered {count} files{grid} into {output_dir} in {time.perf_counter() - start:.1f} s with one model load"
        )


def _check_usage(
    text, text_file, batch, output, output_dir, adapters, config, ckpt_dir, prompt_audio, prompt_text, reference_audio
) -> None:
    """Option combinations that cannot work: usage errors (exit 2) before anything loads."""
    sources = [
        name for name, value in (("--text", text), ("--text-file", text_file), ("--batch", batch)) if value
    ]
    if len(sources) != 1:
        raise typer.BadParameter(
            "give exactly one of them", param_hint="'--text' / '--text-file' / '--batch'"
        )
    if output is not None and output_dir is not None:
        raise typer.BadParameter("give one of them, not both", param_hint="'--output' / '--output-dir'")
    if text is None and output_dir is None:
        raise typer.BadParameter(
            f"{sources[0]} writes one file per text: pass --output-dir", param_hint="'--output-dir'"
        )
    if text is not None and output is None and output_dir is None:
        raise typer.BadParameter("where to write the audio: --output FILE.wav", param_hint="'--output'")
    if output is not None and output.suffix.lower() != ".wav":
        raise typer.BadParameter(f"{output}: voxcpm writes WAV files; give a path ending in .wav", param_hint="'--output'")
    if len(adapters) > 1 and output is not None:
        raise typer.BadParameter(
            "several --lora-ckpt write one file per adapter: pass --output-dir instead",
            param_hint="'--output'",
        )
    if batch is not None and (prompt_audio or prompt_text or reference_audio):
        raise typer.BadParameter(
            "--batch takes prompts per line (prompt_audio, prompt_text, reference_audio)",
            param_hint="'--prompt-audio' / '--prompt-text' / '--reference-audio'",
        )
    if config is not None and not adapters:
        raise typer.BadParameter(
            "the LoRA config needs the adapter's weights: add --lora-ckpt DIR", param_hint="'--config'"
        )
    if ckpt_dir is None and not adapters:
        raise typer.BadParameter(
            "which model? pass --ckpt-dir (or --lora-ckpt, whose base_model is used)",
            param_hint="'--ckpt-dir'",
        )
