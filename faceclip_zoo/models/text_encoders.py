"""transformers text backbones of the FLUX stage: the T5 v1.1 encoder inside FaceT5, and
the CLIP-L text model whose pooled output is FLUX's pooled_prompt_embeds. Offline.

transformers owns the models and tokenizers; here we only build them from our named
configs or local folders, and build their vocabularies where no hub is reachable:
- CLIP: the BPE merges file open_clip ships is OpenAI's own, so the vocabulary of
  openai/clip-vit-large-patch14 is rebuilt from it exactly (same ids; size checked).
- T5: no package ships T5's SentencePiece file, so the real vocabulary is read from a
  local folder (FLUX.1-dev/tokenizer_2, google/t5-v1_1-xxl, or a model directory's
  tokenizer/); tests and quickstarts use "builtin-words", a small Unigram vocabulary.
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from faceclip_zoo.config import CLIP_TEXT_CONFIGS, T5Config
from faceclip_zoo.utils import UserError

CLIP_VOCAB_SIZE = 49408


# ------------------------------------------------------------------------------ T5
def build_t5_encoder(cfg: T5Config) -> torch.nn.Module:
    """transformers T5EncoderModel (or UMT5EncoderModel, architecture "umt5") of the config,
    random init (weights loaded by the caller). Both keep the same module names (shared,
    encoder.block.N, encoder.final_layer_norm); umT5 has a position bias in every block."""
    if cfg.architecture == "umt5":
        from transformers import UMT5Config, UMT5EncoderModel

        return UMT5EncoderModel(UMT5Config(**cfg.transformers_kwargs()))
    from transformers import T5Config as HFT5Config, T5EncoderModel

    return T5EncoderModel(HFT5Config(**cfg.transformers_kwargs()))


# Words of the builtin vocabulary: the synthetic captions' words and common prompt words.
# Anything else falls back to single characters (or <unk>).
_BUILTIN_WORDS = """
a an the of and or in on at to with from for by is are photo picture portrait image person man
woman boy girl child people face smiling surprised neutral wearing shirt hat glasses and in front
background lit light left right above below front back red blue green yellow black white grey gray
brown orange purple pink dark bright sunny studio outdoor indoor street city beach forest park
mountain room office garden night day smile hair short long beard young old close up wearing
jacket suit dress coat sweater t-shirt sunglasses cap looking camera standing sitting holding
""".split()


@lru_cache(maxsize=None)
def builtin_t5_vocab() -> tuple[tuple[str, float], ...]:
    """(piece, log-prob) list: T5's special tokens at T5's ids (pad 0, eos 1, unk 2), then
    whole words ("▁word"), then single characters as a fallback."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    words = sorted(set(_BUILTIN_WORDS))
    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.-'!?"
    pieces = [("▁" + w, -2.0) for w in words] + [("▁", -3.0)]
    pieces += [(c, -8.0) for c in chars] + [("▁" + c, -7.0) for c in chars if ("▁" + c, -2.0) not in pieces]
    seen, out = set(), []
    for piece, score in specials + pieces:
        if piece not in seen:
            seen.add(piece)
            out.append((piece, score))
    return tuple(out)


def build_t5_tokenizer(cfg: T5Config, folder: str | os.PathLike | None = None):
    """The T5 tokenizer: from `folder` (spiece.model / tokenizer.json) when given, else the
    builtin vocabulary when the config names it. Its size must fit the embedding table."""
    from transformers import AutoTokenizer, T5Tokenizer

    if folder is not None:
        path = Path(folder)
        if not path.is_dir():
            raise UserError(f"T5 tokenizer folder {path} does not exist")
        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # transformers raises many types for a bad folder
            raise UserError(f"cannot read a T5 tokenizer from {path} ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200]}); it needs spiece.model or tokenizer.json") from None
    elif cfg.tokenizer == "builtin-words":
        tok = T5Tokenizer(vocab=list(builtin_t5_vocab()), extra_ids=0)
    else:
        raise UserError("this FaceT5 config needs the T5 v1.1 tokenizer files: give the folder holding them "
                        "(e.g. FLUX.1-dev/tokenizer_2 or google/t5-v1_1-xxl) as t5_tokenizer / --t5-tokenizer")
    size = len(tok)
    if not 0 < size <= cfg.vocab_size:
        raise UserError(f"T5 tokenizer has {size} tokens but the encoder's embedding has {cfg.vocab_size} rows")
    return tok


def t5_token_ids(tokenizer, prompts: list[str], length: int) -> torch.Tensor:
    """Padded to `length` and truncated, as FLUX and the release tokenize (no attention mask
    is used downstream: padding tokens are attended, as in both)."""
    return tokenizer(list(prompts), max_length=length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids


# ------------------------------------------------------------------------------ CLIP text
def clip_text_config(spec: str | dict[str, Any]) -> dict[str, Any]:
    """A named CLIP text config or a dict of CLIPTextConfig kwargs."""
    if isinstance(spec, dict):
        return dict(spec)
    if spec not in CLIP_TEXT_CONFIGS:
        raise UserError(f"unknown CLIP text config {spec!r}; known: {sorted(CLIP_TEXT_CONFIGS)} "
                        "(or give a transformers CLIPTextModel folder)")
    return dict(CLIP_TEXT_CONFIGS[spec])


def build_clip_text_model(config: dict[str, Any]) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**config))


@lru_cache(maxsize=1)
def _openai_clip_vocab() -> tuple[dict[str, int], tuple[str, ...]]:
    """OpenAI CLIP's vocabulary and merges, rebuilt from the BPE file open_clip ships:
    256 byte symbols, the same with '</w>', one token per merge, then the two specials."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = tuple(lines[1:49152 - 256 - 2 + 1])
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(folder: str | os.PathLike | None = None, max_length: int = 77):
    """transformers CLIPTokenizer: from a folder (FLUX.1-dev/tokenizer) or rebuilt from
    open_clip's copy of OpenAI's BPE (identical ids). Its size is checked."""
    from transformers import AutoTokenizer, CLIPTokenizer

    if folder is not None:
        if not Path(folder).is_dir():
            raise UserError(f"CLIP tokenizer folder {folder} does not exist (e.g. FLUX.1-dev/tokenizer; "
                            "leave clip_tokenizer empty for OpenAI's vocabulary)")
        try:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise UserError(f"cannot read a CLIP tokenizer from {folder} ({type(exc).__name__})") from None
    else:
        vocab, merges = _openai_clip_vocab()
        tok = CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges],
                            model_max_length=max_length)
    if len(tok) != CLIP_VOCAB_SIZE:
        raise UserError(f"CLIP tokenizer has {len(tok)} tokens, expected {CLIP_VOCAB_SIZE}")
    return tok
