"""Many utterances with one model load, optionally under several LoRA adapters swapped in place.

    utterances = read_text_file("lines.txt")            # or read_batch_manifest("batch.jsonl")
    adapters = [load_adapter("runs/a/step_2000"), load_adapter("runs/b/step_2000")]  # read and checked once
    tts = VoxCPM.from_adapters(adapters)                 # the base their lora_config.json names
    for done in render(tts, utterances, Path("out"), adapters, seed=7):
        print(done.path)                                  # out/a/0001.wav, out/a/0002.wav, out/b/0001.wav, ...

Every utterance of a run uses the same seed, so the adapters' outputs can be compared side by side.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from voxcpm_core.adapters import Adapter
from voxcpm_core.data.audio import write_wav
from voxcpm_core.data.manifest import resolve_audio_path
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.generation.options import SamplingOptions
from voxcpm_core.generation.sampling import check_prompt_args, check_reference_path

if TYPE_CHECKING:  # the API sits above generation: rendering only calls the loaded model it is given
    from voxcpm_core.api import VoxCPM

BATCH_KEYS = ("text", "prompt_audio", "prompt_text", "reference_audio", "id")


@dataclass(frozen=True)
class Utterance:
    """One text to speak; its audio goes to ``<out_dir>/<id>.wav``, or to ``output`` when set."""

    id: str
    text: str
    prompt_audio: Path | None = None
    prompt_text: str | None = None
    output: Path | None = None
    reference_audio: Path | None = None  # VoxCPM2: a clip of the voice, no transcript


@dataclass(frozen=True)
class Rendered:
    adapter: Path | None  # the adapter it was spoken with
    utterance: Utterance
    path: Path
    seconds: float  # of audio
    elapsed: float  # wall time of the generation
    seed: int
    tries: int  # > 1 when bad-case retries ran


def _read_lines(path: Path, what: str) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise VoxCPMError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise VoxCPMError(f"{path}: is a directory; pass the {what} inside it") from None
    except UnicodeDecodeError as exc:
        raise VoxCPMError(f"{path}: not UTF-8 text (byte {exc.start}); save the {what} as UTF-8") from None


def _line_id(line: int, total: int) -> str:
    return f"{line:0{max(4, len(str(total)))}d}"


def read_text_file(path: str | os.PathLike) -> list[Utterance]:
    """One utterance per non-blank line; ids are the line numbers (``0001``), so blank lines keep the numbering."""
    lines = _read_lines(Path(path), "text file")
    utterances = [
        Utterance(_line_id(i, len(lines)), text.strip()) for i, text in enumerate(lines, 1) if text.strip()
    ]
    if not utterances:
        raise VoxCPMError(f"{path}: no text to speak (every line is blank); put one text per line")
    return utterances


def _batch_entry(raw: str, path: Path, line: int, total: int) -> Utterance:
    where = f"{path}:{line}"
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise VoxCPMError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise VoxCPMError(f'{where}: expected a JSON object like {{"text": "...", "id": "greeting"}}')
    unknown = [k for k in obj if k not in BATCH_KEYS]
    if unknown:
        raise VoxCPMError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(BATCH_KEYS)}")
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise VoxCPMError(f'{where}: needs a non-empty "text" string')
    for key in ("prompt_audio", "prompt_text", "reference_audio"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise VoxCPMError(f'{where}: "{key}" must be a string')
    uid = obj.get("id", _line_id(line, total))
    if isinstance(uid, bool) or not isinstance(uid, (str, int)):
        raise VoxCPMError(f'{where}: "id" must be a string or a number (it names the output file)')
    uid = str(uid)
    if not uid or uid in (".", "..") or any(c in uid for c in '/\\:*?"<>|\0'):
        raise VoxCPMError(f'{where}: "id" {uid!r} cannot be a file name; use letters, digits, "-" or "_"')
    prompt_audio, reference_audio = (
        None if obj.get(key) is None else resolve_audio_path(obj[key], path.parent, Path.cwd())[0]
        for key in ("prompt_audio", "reference_audio")
    )
    try:
        check_prompt_args(prompt_audio, obj.get("prompt_text"))
        check_reference_path(reference_audio)
    except VoxCPMError as exc:
        raise VoxCPMError(f"{where}: {exc}") from None
    return Utterance(uid, text, prompt_audio, obj.get("prompt_text"), reference_audio=reference_audio)


def read_batch_manifest(path: str | os.PathLike) -> list[Utterance]:
    """JSONL, one ``{"text": ..., "prompt_audio": ..., "prompt_text": ..., "reference_audio": ..., "id": ...}`` per
    line (only text required).

    ``prompt_audio`` and ``reference_audio`` resolve like a training manifest's audio (the manifest's folder, then the current one).
    Every line is checked before anything is rendered.
    """
    path = Path(os.path.abspath(path))
    lines = _read_lines(path, "batch manifest")
    utterances, seen = [], {}
    for line, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        utterance = _batch_entry(raw, path, line, len(lines))
        if utterance.id in seen:
            raise VoxCPMError(
                f"{path}:{line}: id {utterance.id!r} already used on line {seen[utterance.id]}; ids name the output files"
            )
        seen[utterance.id] = line
        utterances.append(utterance)
    if not utterances:
        raise VoxCPMError(f'{path}: no lines to render; write one {{"text": "..."}} object per line')
    return utterances


def read_utterances(
    text: str | None = None,
    text_file: str | os.PathLike | None = None,
    batch: str | os.PathLike | None = None,
    prompt_audio: str | os.PathLike | None = None,
    prompt_text: str | None = None,
    output: str | os.PathLike | None = None,
    reference_audio: str | os.PathLike | None = None,
) -> list[Utterance]:
    """The texts of one run from exactly one source: ``text`` (id 0001, or written to ``output``), the lines of
    ``text_file``, or a ``batch`` manifest (prompts per line). The prompt and reference apply to
    ``text``/``text_file``."""
    if sum(source is not None for source in (text, text_file, batch)) != 1:
        raise VoxCPMError("give exactly one of text, text_file and batch")
    check_prompt_args(prompt_audio, prompt_text)
    check_reference_path(reference_audio)
    if batch is not None:
        if prompt_audio is not None or reference_audio is not None:
            raise VoxCPMError(
                f"{batch}: a batch manifest gives prompts per line (prompt_audio, prompt_text, reference_audio)"
            )
        return read_batch_manifest(batch)
    voice = dict(
        prompt_audio=Path(prompt_audio) if prompt_audio is not None else None,
        prompt_text=prompt_text,
        reference_audio=Path(reference_audio) if reference_audio is not None else None,
    )
    if text_file is not None:
        return [Utterance(u.id, u.text, **voice) for u in read_text_file(text_file)]
    return [Utterance(_line_id(1, 1), text, **voice, output=Path(output) if output is not None else None)]


def adapter_folder_names(adapters: Sequence[str | os.PathLike]) -> list[str]:
    """One distinct output subfolder per adapter: its folder name, prefixed with parents while names clash."""
    parts = [Path(os.path.abspath(a)).parts for a in adapters]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["-".join(p[-depth:]).lstrip("/-") for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{i + 1}-{Path(a).name}" for i, a in enumerate(adapters)]  # the same folder given twice


def render(
    tts: VoxCPM,
    utterances: Sequence[Utterance],
    out_dir: str | os.PathLike,
    adapters: Sequence[Adapter] = (),
    options: SamplingOptions | None = None,
    seed: int = 0,
) -> Iterator[Rendered]:
    """Speak every utterance (under every adapter, swapped in with ``load_lora``) into ``out_dir``.

    One adapter or none: ``out_dir/<id>.wav`` (or the utterance's ``output``); several:
    ``out_dir/<adapter folder>/<id>.wav``. Yields each result as soon as its file is written.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise VoxCPMError(f"{out_dir}: exists and is not a directory; choose an output directory")
    names = adapter_folder_names([adapter.path for adapter in adapters]) if len(adapters) > 1 else [""]
    folders = [out_dir / name for name in names]
    for adapter, folder in zip(adapters or [None], folders, strict=True):
        if adapter is not None:
            tts.load_lora(adapter)
        for utterance in utterances:
            start = time.perf_counter()
            result = tts.synthesize(
                utterance.text, utterance.prompt_audio, utterance.prompt_text, seed, options, utterance.reference_audio
            )
            elapsed = time.perf_counter() - start
            path = (
                utterance.output
                if len(adapters) <= 1 and utterance.output
                else folder / f"{utterance.id}.wav"
            )
            write_wav(path, result.wav, result.sample_rate)
            seconds = len(result.wav) / result.sample_rate
            yield Rendered(
                adapter.path if adapter else None, utterance, path, seconds, elapsed, seed, result.tries
            )
