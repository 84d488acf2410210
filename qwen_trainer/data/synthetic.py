"""Small example data for tests and the demo, made offline from the bundled corpus.

- `write_corpus_jsonl`: the corpus paragraphs as `{"text": ...}` lines (input to `trainer data preprocess`).
- `alpaca_samples`: instruction/input/output samples from a few deterministic task templates, so a tiny
  model can visibly learn them; `key_style` writes the aliases (query/response, prompt/completion) too.
- `make_demo_data`: tokenizer + corpus jsonl + SFT json in one directory.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

from .tiny_tokenizer import build_tiny_tokenizer, corpus_texts

_WORDS = (
    "model data token batch loss rate step layer expert router schedule checkpoint worker "
    "gradient optimizer sequence window vocabulary sample prompt response"
).split()

_GLOSSARY = {
    "token": "A token is a piece of text with its own entry in the vocabulary.",
    "batch": "A batch is the group of sequences that contribute to one optimizer step.",
    "warmup": "Warmup is the period in which the learning rate climbs from zero.",
    "checkpoint": "A checkpoint holds the weights, the optimizer state and the data position.",
    "expert": "An expert is one of the small feed forward blocks a router chooses from.",
    "packing": "Packing places several short examples in one sequence.",
    "loss": "The loss measures how far the guesses of the model are from the data.",
    "optimizer": "The optimizer turns gradients into updates of the weights.",
}


def write_corpus_jsonl(path: str | Path, repeat: int = 1, key: str = "text") -> Path:
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(repeat):
            for text in corpus_texts():
                f.write(json.dumps({key: text}) + "\n")
    return path


def _sample(rng: random.Random) -> dict:
    kind = rng.randrange(4)
    if kind == 0:
        words = rng.sample(_WORDS, rng.randint(2, 4))
        return {"instruction": "Reverse the order of these words.", "input": " ".join(words),
                "output": " ".join(reversed(words))}
    if kind == 1:
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        return {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
    if kind == 2:
        term = rng.choice(sorted(_GLOSSARY))
        return {"instruction": "Explain the term briefly.", "input": term, "output": _GLOSSARY[term]}
    words = rng.sample(_WORDS, rng.randint(2, 4))
    return {"instruction": "Write these words in capital letters.", "input": " ".join(words),
            "output": " ".join(w.upper() for w in words)}


_ALIASES = {
    "alpaca": ("instruction", "input", "output"),
    "query": ("query", "input", "response"),
    "prompt": ("prompt", "input", "completion"),
}


def alpaca_samples(n: int, seed: int = 0, key_style: str = "alpaca") -> list[dict]:
    rng = random.Random(seed)
    styles = list(_ALIASES) if key_style == "mixed" else [key_style]
    out = []
    for i in range(n):
        s = _sample(rng)
        ins, inp, outp = _ALIASES[styles[i % len(styles)]]
        record = {ins: s["instruction"], outp: s["output"]}
        if s["input"]:
            record[inp] = s["input"]
        out.append(record)
    return out


def write_alpaca(path: str | Path, n: int, seed: int = 0, key_style: str = "alpaca", lines: bool = False) -> Path:
    """Write samples as a JSON list (default) or as JSON lines."""
    path = Path(path)
    samples = alpaca_samples(n, seed, key_style)
    with path.open("w", encoding="utf-8") as f:
        if lines:
            for s in samples:
                f.write(json.dumps(s) + "\n")
        else:
            json.dump(samples, f, indent=1)
    return path


def make_demo_data(out_dir: str | Path, vocab_size: int = 600, sft_samples: int = 512,
                   corpus_repeat: int = 1, seed: int = 0) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(out / "tokenizer", vocab_size=vocab_size)
    corpus = write_corpus_jsonl(out / "corpus.jsonl", repeat=corpus_repeat)
    sft = write_alpaca(out / "alpaca.json", sft_samples, seed=seed)
    return {"tokenizer": str(tok), "corpus": str(corpus), "sft": str(sft)}


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Write the tiny tokenizer, corpus jsonl and alpaca SFT json")
    parser.add_argument("output_dir")
    parser.add_argument("--vocab-size", type=int, default=600)
    parser.add_argument("--sft-samples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(make_demo_data(args.output_dir, args.vocab_size, args.sft_samples, seed=args.seed), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
