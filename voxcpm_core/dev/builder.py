"""Model directories with random weights in the official layout: tiny ones for tests and demos,
or any config (e.g. the real VoxCPM1.5 size) for benchmarks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers
from tokenizers.models import BPE

from voxcpm_core.data.tokenizer import SPACE
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.families import family_of, parse_config
from voxcpm_core.io.atomic import atomic_dir
from voxcpm_core.io.checkpoint import TOKENIZER_FILES, read_config_dict, write_model_files

SPECIAL_TOKENS = {0: "<unk>", 1: "<s>", 2: "</s>"}
AUDIO_TOKENS = {  # ids fixed by the model: 101..104 frame the audio, 105..112 reserved
    101: "<|audio_start|>",
    102: "<|audio_end|>",
    103: "<|audio_prompt_start|>",
    104: "<|audio_prompt_end|>",
    105: "<|background|>",
    106: "<|/background|>",
    107: "<|characters|>",
    108: "<|/characters|>",
    109: "<|speaker_id|>",
    110: "<|/speaker_id|>",
    111: "<|span|>",
    112: "<|/span|>",
}
CJK_PUNCTUATION = "，。！？、：；“”‘’（）《》【】…—"
COMMON_HANZI = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而"
    "能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意"
    "进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口"
    "使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数"
    "件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉"
    "望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传"
    "近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒"
    "未持取设始版双历越史商千片容研像找友孩站广改议形委早房音火际则首单据导影失拿网香似斯专石若兵弟谁校读志飞观争究包组"
    "造落视济喜离虽坏兴切尔吗团跑您们啊吧哦嗯谢早晚朋歌唱声音乐"
)
MERGES = [(SPACE, "t"), ("h", "e"), ("你", "好"), ("世", "界"), ("谢", "谢")]


def tiny_vocab() -> list[str]:
    """Tokens by id: special tokens, fillers up to the audio tokens at 101..112, then characters and bytes."""
    vocab = [SPECIAL_TOKENS.get(i) or AUDIO_TOKENS.get(i) or f"<reserved_{i}>" for i in range(113)]
    chars = [SPACE, *(chr(c) for c in range(0x21, 0x7F)), *CJK_PUNCTUATION, *COMMON_HANZI]
    for token in [*chars, *(a + b for a, b in MERGES), *(f"<0x{b:02X}>" for b in range(256))]:
        if token not in vocab:
            vocab.append(token)
    return vocab


def build_tiny_tokenizer(out_dir: Path) -> Path:
    """Write a small Llama-style BPE tokenizer (ASCII, common CJK, byte fallback) into ``out_dir``.

    Ids 101..112 are declared in ``tokenizer_config.json`` only, as in the released models.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(tiny_vocab())}
    tk = Tokenizer(BPE(vocab=vocab, merges=MERGES, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tk.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS.values()])
    tk.save(str(out_dir / TOKENIZER_FILES[0]))
    spec = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    declared = SPECIAL_TOKENS | AUDIO_TOKENS
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): {"content": t, **spec} for i, t in declared.items()},
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "tokenizer_class": "LlamaTokenizer",
    }
    (out_dir / TOKENIZER_FILES[1]).write_text(
        json.dumps(tokenizer_config, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out_dir / TOKENIZER_FILES[2]).write_text(json.dumps(special_map, indent=2), encoding="utf-8")
    return out_dir


def tiny_config(sample_rate: int = 16000) -> dict:
    """A config.json dict for a model small enough to train and generate on CPU in seconds.

    16000: a VoxCPM-0.5B-like layout (patch 2, hop 640, muP); 44100: VoxCPM1.5-like (patch 4, hop 1764).
    """
    if sample_rate == 16000:
        patch_size, use_mup, vae = 2, True, dict(encoder_rates=[2, 5, 8, 8], decoder_rates=[8, 8, 5, 2])
    elif sample_rate == 44100:
        patch_size, use_mup, vae = (
            4,
            False,
            dict(encoder_rates=[2, 3, 6, 7, 7], decoder_rates=[7, 7, 6, 3, 2]),
        )
    else:
        raise VoxCPMError(f"tiny_config: sample_rate {sample_rate} is not supported; use 16000 or 44100")
    head_dim, feat_dim = 16, 16
    factors = [round(1.0 + 0.5 * i, 2) for i in range(head_dim // 2)]
    return {
        "architecture": "voxcpm",
        "lm_config": {
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "max_position_embeddings": 4096,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-05,
            "rope_theta": 10000,
            "rope_scaling": {
                "type": "longrope",
                "long_factor": factors,
                "short_factor": factors,
                "original_max_position_embeddings": 4096,
            },
            "vocab_size": len(tiny_vocab()),
            "scale_emb": 12,
            "dim_model_base": 256,
            "scale_depth": 1.4,
            "use_mup": use_mup,
        },
        "patch_size": patch_size,
        "feat_dim": feat_dim,
        "scalar_quantization_latent_dim": 32,
        "scalar_quantization_scale": 9,
        "residual_lm_num_layers": 1,
        "encoder_config": {"hidden_dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 1},
        "dit_config": {
            "hidden_dim": 32,
            "ffn_dim": 64,
            "num_heads": 2,
            "num_layers": 1,
            "cfm_config": {
                "sigma_min": 1e-06,
                "solver": "euler",
                "t_scheduler": "log-norm",
                "inference_cfg_rate": 2.0,
            },
        },
        "audio_vae_config": {
            "encoder_dim": 8,
            "latent_dim": feat_dim,
            "decoder_dim": 64,
            "depthwise": True,
            "sample_rate": sample_rate,
            **vae,
        },
        "max_length": 4096,
        "device": "cpu",
        "dtype": "float32",
    }


def build_model_dir(
    out_dir: Path,
    config_dict: dict,
    seed: int = 0,
    tokenizer_from: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model directory with random weights (seeded) for ``config_dict``.

    The tokenizer files are copied from ``tokenizer_from``, or the tiny tokenizer is built.
    """
    config = parse_config(config_dict, source="config")
    if tokenizer_from is None and len(tiny_vocab()) > config.lm_config.vocab_size:
        raise VoxCPMError(
            f"lm_config.vocab_size {config.lm_config.vocab_size} is smaller than the tiny tokenizer's "
            f"{len(tiny_vocab())} tokens; raise it or pass tokenizer_from"
        )
    torch.manual_seed(seed)
    family = family_of(config)
    model, vae = family.network(config), family.build_vae(config)
    with atomic_dir(Path(out_dir), overwrite) as tmp:
        tokenizer_dir = Path(tokenizer_from) if tokenizer_from is not None else build_tiny_tokenizer(tmp)
        write_model_files(tmp, model, vae, config_dict, tokenizer_dir)
    return Path(out_dir)


def build_like(source_dir: str | os.PathLike, out_dir: Path, seed: int = 0, overwrite: bool = False) -> Path:
    """A random-weight twin of a (weightless) model folder: its ``config.json`` and tokenizer files.

    E.g. the real VoxCPM1.5 size from ``../shared/models/VoxCPM1.5`` for benchmarks.
    """
    source_dir = Path(source_dir)
    return build_model_dir(
        out_dir, read_config_dict(source_dir), seed, tokenizer_from=source_dir, overwrite=overwrite
    )
