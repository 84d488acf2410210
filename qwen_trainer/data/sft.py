"""Supervised finetuning samples from alpaca-style JSON, rendered with the Qwen ChatML template.

Records: `instruction` (aliases `query`, `prompt`, `question`), optional `input` (`context`), `output` (aliases
`response`, `completion`, `content`, `answer`). A file is a JSON list or JSON lines. Each record becomes

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n{instruction}\\n{input}<|im_end|>\\n
    <|im_start|>assistant\\n{output}<|im_end|>

and only `{output}<|im_end|>` carries loss. Samples are shifted (input = ids[:-1], target = ids[1:]), truncated to
the pad length (a prompt that does not fit leaves no response and the sample is skipped) and right-padded with
the pad token (targets -100). With packing, samples are placed one after another into sequences in file order
until the next one would overflow; position ids restart at 0 for each sample (and for the padding tail), which
also confines attention to each sample in the CPU engine's model.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from qwen_trainer.errors import UserError

from .batches import IGNORE_INDEX

SYSTEM_PROMPT = "You are a helpful assistant."
INSTRUCTION_KEYS = ("instruction", "query", "prompt", "question")
INPUT_KEYS = ("input", "context")
OUTPUT_KEYS = ("output", "response", "completion", "content", "answer")


def read_records(path: str, field: str) -> list[dict]:
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist", path=field)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON (line {err.lineno}: {err.msg})", path=field) from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {n} is not valid JSON ({err.msg})", path=field) from None
    if not records:
        raise UserError(f"{path} holds no samples", path=field)
    return records


def _first(record: dict, keys: tuple[str, ...]) -> Optional[str]:
    for k in keys:
        v = record.get(k)
        if v is not None:
            return v if isinstance(v, str) else str(v)
    return None


def normalize(record: Any, where: str) -> tuple[str, str, str]:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object with instruction/input/output")
    instruction, inp, output = _first(record, INSTRUCTION_KEYS), _first(record, INPUT_KEYS), _first(record, OUTPUT_KEYS)
    if instruction is None or output is None:
        missing = "instruction (or query/prompt/question)" if instruction is None else "output (or response/completion/content)"
        raise UserError(f"{where}: no {missing}")
    return instruction, inp or "", output


def chatml_prompt(user: str, system: str = SYSTEM_PROMPT) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


class SftEncoder:
    """Turns (instruction, input, output) into token ids and the matching loss labels."""

    def __init__(self, tokenizer, system_prompt: str = SYSTEM_PROMPT):
        self.tok = tokenizer
        self.system = system_prompt
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if self.im_end is None or self.im_end == getattr(tokenizer, "unk_token_id", None):
            raise UserError("the tokenizer has no <|im_end|> token (needed by the ChatML template)",
                            path="model.tokenizerPath")
        from .tokenizer import pad_id

        self.pad = pad_id(tokenizer)

    def prompt_text(self, instruction: str, inp: str) -> str:
        user = f"{instruction}\n{inp}" if inp else instruction
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": user}]
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return chatml_prompt(user, self.system)

    def encode(self, instruction: str, inp: str, output: str) -> tuple[list[int], list[int]]:
        """(ids, labels): labels are -100 over the prompt and equal to ids over the response."""
        prompt = self.tok(self.prompt_text(instruction, inp), add_special_tokens=False)["input_ids"]
        response = self.tok(output, add_special_tokens=False)["input_ids"] + [self.im_end]
        ids = prompt + response
        labels = [IGNORE_INDEX] * len(prompt) + response
        return ids, labels


@dataclass
class SftStats:
    samples: int
    skipped: int
    truncated: int
    sequences: int
    loss_tokens: int


def shift_and_fit(ids: list[int], labels: list[int], length: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Shift to (input, target), truncate to `length`; None if no response token survives."""
    inp = np.asarray(ids[:-1], dtype=np.int64)[:length]
    tgt = np.asarray(labels[1:], dtype=np.int64)[:length]
    if not (tgt != IGNORE_INDEX).any():
        return None
    return inp, tgt


class SftSource:
    """Fixed-length SFT sequences (padded, optionally packed), held in memory."""

    def __init__(self, tokens: np.ndarray, targets: np.ndarray, positions: np.ndarray, name: str, stats: SftStats,
                 seed: int, shuffle: bool = True):
        self.tokens, self.targets, self.positions = tokens, targets, positions
        self.name = name
        self.stats = stats
        self.seed = seed
        self.shuffle = shuffle
        # batch-reading threads (training.numWorkers) sample concurrently, and a step may straddle two epochs
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def _order(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                n = len(self)
                perm = np.random.RandomState((self.seed + epoch) % (2**32)).permutation(n) if self.shuffle \
                    else np.arange(n)
                self._perms[epoch] = perm
                for old in [e for e in self._perms if e < epoch - 1]:  # keep this epoch and the one before
                    del self._perms[old]
            return perm

    def sample(self, index: int) -> dict[str, np.ndarray]:
        n = len(self)
        row = self._order(index // n)[index % n]
        return {"tokens": self.tokens[row], "targets": self.targets[row], "position_ids": self.positions[row]}


def build(path: str, field: str, tokenizer, length: int, packing: bool, seed: int, name: str = "train",
          shuffle: bool = True) -> SftSource:
    encoder = SftEncoder(tokenizer)
    records = read_records(path, field)
    pieces: list[tuple[np.ndarray, np.ndarray]] = []
    skipped = truncated = 0
    for i, record in enumerate(records):
        ids, labels = encoder.encode(*normalize(record, f"{field}: {path} sample {i}"))
        fitted = shift_and_fit(ids, labels, length)
        if fitted is None:
            skipped += 1
            continue
        truncated += len(ids) - 1 > length
        pieces.append(fitted)
    if not pieces:
        raise UserError(f"no sample of {path} fits in {length} tokens with room for its response", path=field)
    seqs = pack(pieces, length) if packing else [[p] for p in pieces]
    n = len(seqs)
    tokens = np.full((n, length), encoder.pad, dtype=np.int64)
    targets = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((n, length), dtype=np.int64)
    for r, group in enumerate(seqs):
        at = 0
        for inp, tgt in group:
            k = len(inp)
            tokens[r, at:at + k] = inp
            targets[r, at:at + k] = tgt
            positions[r, at:at + k] = np.arange(k)
            at += k
        positions[r, at:] = np.arange(length - at)  # the padding tail is a segment of its own
    stats = SftStats(len(pieces), skipped, int(truncated), n, int((targets != IGNORE_INDEX).sum()))
    return SftSource(tokens, targets, positions, name, stats, seed, shuffle)


def pack(pieces: list[tuple[np.ndarray, np.ndarray]], length: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Greedy in order: start a new sequence when the next sample would overflow this one."""
    out: list[list] = []
    current: list = []
    used = 0
    for p in pieces:
        k = len(p[0])
        if current and used + k > length:
            out.append(current)
            current, used = [], 0
        current.append(p)
        used += k
    if current:
        out.append(current)
    return out
