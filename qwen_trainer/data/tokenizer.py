"""Load the Qwen tokenizer from a Hugging Face directory and pick its special ids."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from qwen_trainer.errors import UserError

ENDOFTEXT = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def has_tokenizer(path: Optional[str]) -> bool:
    return bool(path) and any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: str, field: str = "model.tokenizerPath"):
    if not os.path.isdir(path):
        raise UserError(f"tokenizer directory {path} does not exist", path=field)
    if not has_tokenizer(path):
        raise UserError(f"no tokenizer files (tokenizer.json or vocab.json) in {path}", path=field)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, padding_side="right")
    except Exception as err:  # a broken tokenizer dir is the user's to fix
        raise UserError(f"cannot load the tokenizer in {path}: {err}", path=field) from None
    return tok


def eod_id(tok) -> int:
    """The end-of-document id: `<|endoftext|>` when the vocabulary has it (Qwen base and chat), else EOS."""
    ids = tok.convert_tokens_to_ids([ENDOFTEXT])
    unk = getattr(tok, "unk_token_id", None)
    if ids and ids[0] is not None and ids[0] != unk:
        return int(ids[0])
    if tok.eos_token_id is None:
        raise UserError("the tokenizer has neither <|endoftext|> nor an EOS token", path="model.tokenizerPath")
    return int(tok.eos_token_id)


def pad_id(tok) -> int:
    return int(tok.pad_token_id) if tok.pad_token_id is not None else eod_id(tok)
