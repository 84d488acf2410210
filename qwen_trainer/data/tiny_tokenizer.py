"""A tiny Qwen2-style tokenizer built offline, for tests and the demo.

Byte-level BPE trained on the bundled corpus with the Qwen pre-tokenizer pattern, the Qwen special tokens
(`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`) and the ChatML chat template, saved as a Hugging Face
tokenizer directory that `AutoTokenizer.from_pretrained` loads like a real Qwen checkpoint's tokenizer.
Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# The split pattern of the Qwen2 tokenizer (letters, numbers one by one, punctuation, whitespace runs).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CORPUS_DIR = Path(__file__).parent / "corpus"


def corpus_texts() -> list[str]:
    """Paragraphs of the bundled corpus."""
    out = []
    for path in sorted(CORPUS_DIR.glob("*.txt")):
        out.extend(p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip())
    return out


def build_tiny_tokenizer(
    output_dir: str | Path, vocab_size: int = 600, texts: Optional[Iterable[str]] = None
) -> Path:
    """Train and save the tokenizer; returns the directory. The vocabulary (specials included) is `vocab_size`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = list(texts) if texts is not None else corpus_texts()
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Special tokens go after the BPE entries, as in Qwen (151643 = <|endoftext|>).
    tok.add_special_tokens(list(SPECIAL_TOKENS))

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 32768,
        "bos_token": None,
        "eos_token": ENDOFTEXT,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "chat_template": CHATML_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT, "additional_special_tokens": [IM_START, IM_END]}, indent=2)
        + "\n"
    )
    return out


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build the tiny offline Qwen-style tokenizer")
    parser.add_argument("output_dir")
    parser.add_argument("--vocab-size", type=int, default=600)
    args = parser.parse_args(argv)
    print(build_tiny_tokenizer(args.output_dir, args.vocab_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
