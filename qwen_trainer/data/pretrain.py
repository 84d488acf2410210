"""Continued-pretraining samples from Megatron .bin/.idx datasets through megatron.core.datasets.

`BlendedMegatronDatasetBuilder` + `GPTDataset` do the work: blending by weight, the train/valid/test split and
the seeded shuffle, with index caches written under `<output>/data_cache` (rank 0 builds them first, the other
ranks then read them). GPTDataset needs the compiled `megatron.core.datasets.helpers_cpp`; the wheel ships it,
and when it is missing it is built once with `megatron.core.datasets.utils.compile_helpers()` (make + pybind11).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from qwen_trainer.errors import UserError

from .batches import IGNORE_INDEX


class _TokenizerInfo:
    """The few tokenizer facts GPTDataset reads. No pad: Megatron then pads partial samples with -1."""

    def __init__(self, eod: int, vocab_size: int):
        self.eod = eod
        self.eos = eod
        self.vocab_size = vocab_size
        # Part of the dataset cache key, so caches built for another tokenizer are not reused.
        self.unique_identifiers = {"class": "QwenTokenizerInfo", "eod": eod, "vocab_size": vocab_size}

    @property
    def pad(self) -> int:
        return -1


def ensure_helpers(log=print) -> None:
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
        return
    except ImportError:
        pass
    log("megatron.core.datasets.helpers_cpp is missing from the megatron-core install; compiling it")
    try:
        from megatron.core.datasets.utils import compile_helpers

        compile_helpers()
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except Exception as err:
        raise UserError(
            "megatron-core's dataset helpers (helpers_cpp) are missing and could not be compiled "
            f"({err}); install megatron-core from a wheel that includes them, or provide make and pybind11"
        ) from None


def check_prefixes(prefixes: list[str]) -> None:
    problems = []
    for i, p in enumerate(prefixes):
        missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(p + ext)]
        if missing:
            files = " and ".join(f"{p}{suffix}" for suffix in missing)
            problems.append(f"data.pretrain.prefixes[{i}].path: {files} {'does' if len(missing) == 1 else 'do'} not exist")
    if problems:
        from qwen_trainer.errors import UserErrors

        raise UserErrors(problems)


@dataclass
class PretrainSplits:
    train: "GPTSource"
    valid: Optional["GPTSource"]


class GPTSource:
    def __init__(self, dataset, name: str, vocab_size: int):
        self.dataset = dataset
        self.name = name
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, index: int) -> dict[str, np.ndarray]:
        item = self.dataset[index % len(self.dataset)]
        tokens = item["tokens"].numpy()
        targets = item["labels"].numpy().copy()
        targets[item["loss_mask"].numpy() == 0] = IGNORE_INDEX
        top = int(max(tokens.max(initial=0), targets.max(initial=0)))
        if top >= self.vocab_size:
            raise UserError(
                f"the dataset holds token id {top}, beyond the model's vocabulary of {self.vocab_size}; "
                "was it preprocessed with another tokenizer?", path="data.pretrain.prefixes")
        return {"tokens": tokens, "targets": targets, "position_ids": item["position_ids"].numpy()}


def build(prefixes: list[str], weights: list[float], split: str, seq_length: int, seed: int,
          train_samples: int, valid_samples: int, cache_dir: str, eod: int, vocab_size: int,
          log=print) -> PretrainSplits:
    check_prefixes(prefixes)
    ensure_helpers(log)
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    os.makedirs(cache_dir, exist_ok=True)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(list(prefixes), list(weights) if len(prefixes) > 1 else None),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=_TokenizerInfo(eod, vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    valid_ratio = float(split.split(",")[1])
    sizes = [train_samples, valid_samples if valid_ratio > 0 else None, None]
    try:
        train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    except (AssertionError, ValueError, IndexError) as err:
        raise UserError(f"cannot build the pretraining dataset: {err or type(err).__name__}",
                        path="data.pretrain") from None
    if train is None or len(train) == 0:
        raise UserError("the train split is empty; check data.pretrain.split and the dataset size",
                        path="data.pretrain.split")
    return PretrainSplits(GPTSource(train, "train", vocab_size),
                          GPTSource(valid, "valid", vocab_size) if valid is not None and len(valid) else None)
