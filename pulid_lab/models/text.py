"""Tokenizer and text encoder of the original model (docs/models.md).

A word-level tokenizer built with `tokenizers` over the closed ToyFaces vocabulary (vocab.WORDS), wrapped as a
`transformers` fast tokenizer, and a tiny CLIP-style text transformer (`transformers.CLIPTextModel`). Both
save_pretrained / from_pretrained. Captions are checked against the vocabulary first, so an unknown word is
the vocabulary error, never a silent <unk>.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from ..world import vocab

MAX_TOKENS = 32  # the longest caption (all 9 attributes) is 29 tokens with <bos> and <eos>
SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")


def build_tokenizer() -> PreTrainedTokenizerFast:
    words = list(SPECIAL) + list(vocab.WORDS)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(",", behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", model_max_length=MAX_TOKENS)


def tokenize(tokenizer, captions: list[str], device=None) -> torch.Tensor:
    """Captions -> token ids (B, MAX_TOKENS), padded; unknown words raise vocab.VocabularyError."""
    for c in captions:
        vocab.check_words(c)
    ids = tokenizer(list(captions), padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device) if device is not None else ids


def build_text_encoder(hidden: int = 128, layers: int = 3, heads: int = 4) -> CLIPTextModel:
    cfg = CLIPTextConfig(vocab_size=len(SPECIAL) + len(vocab.WORDS), hidden_size=hidden, intermediate_size=hidden * 4,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=MAX_TOKENS,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, projection_dim=hidden)
    return CLIPTextModel(cfg)


def load_text(folder: Path):
    """(tokenizer, text encoder) from ``folder/tokenizer`` and ``folder/text_encoder``."""
    from transformers.utils import logging as hf_logging
    folder = Path(folder)
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 52-tensor load needs no progress bar in every notebook
    try:
        return (PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer"),
                CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32))
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
