"""jsonl -> Megatron indexed dataset (.bin/.idx), tokenized with the Qwen tokenizer.

One document per JSON line, taken from `--json-key`; the end-of-document token is appended to each document.
Tokenization runs in a pool of worker processes; the writer keeps the input order, so the output is the same
for any number of workers. The output prefix gets Megatron's `_<key>_document` suffix, like its own
preprocessing tool, and the final prefix (the value for `data.pretrain.prefixes[].path`) is printed.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Optional

from qwen_trainer.errors import UserError

_TOKENIZER = None
_EOD: Optional[int] = None


@dataclass
class PreprocessResult:
    prefix: str
    documents: int
    tokens: int
    skipped: int
    seconds: float


def _init_worker(tokenizer_dir: str, append_eod: bool) -> None:
    global _TOKENIZER, _EOD
    from .tokenizer import eod_id, load_tokenizer

    _TOKENIZER = load_tokenizer(tokenizer_dir, field="--tokenizer")
    _EOD = eod_id(_TOKENIZER) if append_eod else None


def _encode(item: tuple[int, str, str]) -> tuple[int, Optional[list[int]], Optional[str]]:
    lineno, line, key = item
    line = line.strip()
    if not line:
        return lineno, None, None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return lineno, None, f"line {lineno}: not valid JSON ({err.msg})"
    if not isinstance(record, dict) or key not in record:
        return lineno, None, f"line {lineno}: no {key!r} field"
    text = record[key]
    if not isinstance(text, str):
        return lineno, None, f"line {lineno}: {key!r} is not a string"
    if not text:
        return lineno, None, None
    ids = _TOKENIZER(text, add_special_tokens=False)["input_ids"]
    if _EOD is not None:
        ids.append(_EOD)
    return lineno, ids, None


def _lines(path: str, key: str) -> Iterator[tuple[int, str, str]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            yield n, line, key


def preprocess(
    input_path: str,
    output_prefix: str,
    tokenizer_dir: str,
    json_key: str = "text",
    workers: int = 1,
    append_eod: bool = True,
    progress: bool = True,
    log=print,
) -> PreprocessResult:
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path

    from .tokenizer import load_tokenizer

    if not os.path.isfile(input_path):
        raise UserError(f"input file {input_path} does not exist", path="--input")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(out_dir):
        raise UserError(f"output directory {out_dir} does not exist", path="--output-prefix")
    tok = load_tokenizer(tokenizer_dir, field="--tokenizer")  # fail here, not in a worker
    vocab = len(tok)
    dtype = DType.optimal_dtype(vocab)
    prefix = f"{output_prefix}_{json_key}_document"
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=dtype)

    start = time.time()
    total_lines = _count_lines(input_path) if progress else 0
    docs = tokens = skipped = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_lines, unit="doc", desc="tokenizing", file=sys.stderr, disable=None, mininterval=1.0)
    items = _lines(input_path, json_key)
    pool = None
    try:
        if workers > 1:
            ctx = multiprocessing.get_context("spawn")
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_dir, append_eod))
            results = pool.imap(_encode, items, chunksize=32)
        else:
            _init_worker(tokenizer_dir, append_eod)
            results = map(_encode, items)
        for lineno, ids, problem in results:
            if problem is not None:
                raise UserError(f"{input_path} {problem}", path="--input")
            if bar is not None:
                bar.update(1)
            if ids is None:
                skipped += 1
                continue
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            docs += 1
            tokens += len(ids)
    except BaseException:
        if pool is not None:
            pool.terminate()
        builder.data_file.close()
        for p in (get_bin_path(prefix), get_idx_path(prefix)):
            if os.path.exists(p):
                os.remove(p)
        raise
    finally:
        if bar is not None:
            bar.close()
    if pool is not None:
        pool.close()
        pool.join()
    if docs == 0:
        builder.data_file.close()
        os.remove(get_bin_path(prefix))
        raise UserError(f"{input_path} has no documents with a non-empty {json_key!r}", path="--input")
    builder.finalize(get_idx_path(prefix))
    result = PreprocessResult(prefix, docs, tokens, skipped, time.time() - start)
    log(
        f"wrote {prefix}.bin/.idx: {docs} documents, {tokens} tokens ({skipped} empty lines skipped), "
        f"dtype {dtype.__name__}, {result.seconds:.1f}s"
    )
    return result


def _count_lines(path: str) -> int:
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += block.count(b"\n")
    return n


def add_arguments(parser) -> None:
    parser.add_argument("--input", required=True, help="jsonl file, one document per line")
    parser.add_argument("--output-prefix", required=True, help="output path prefix (gets _<key>_document appended)")
    parser.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer directory")
    parser.add_argument("--json-key", default="text", help="field of each line holding the text (default: text)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    parser.add_argument("--no-append-eod", dest="append_eod", action="store_false",
                        help="do not append the end-of-document token")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args) -> int:
    if args.workers < 1:
        raise UserError("must be at least 1", path="--workers")
    result = preprocess(args.input, args.output_prefix, args.tokenizer, args.json_key, args.workers,
                        args.append_eod, args.progress)
    print(result.prefix)
    return 0
