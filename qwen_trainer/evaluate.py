"""The evaluate stage: downstream tasks through lm-evaluation-harness, and perplexity computed here.

A Megatron-format source is exported to Hugging Face first (into a scratch directory next to the results),
because lm-evaluation-harness runs Hugging Face models. Task names are lm-eval's (mmlu, ceval-valid, cmmlu,
...) plus `perplexity`, which reads the validation split of `data.pretrain` with megatron-core's dataset
builder, so it measures exactly the tokens the training run held out. `evaluate.includePath` points
lm-eval at local task definitions, for clusters that cannot reach the Hugging Face hub.

Results go to `<checkpoint.output.path or the source>/eval_results.json` (written atomically) and, when the
job runs under the operator, into the resource's `status.evaluation`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from qwen_trainer.distenv import DistEnv
from qwen_trainer.errors import UserError, UserErrors
from qwen_trainer.spec import JobSpec, resolve_architecture
from qwen_trainer.spec.resolve import checkpoint_formats

RESULTS_FILE = "eval_results.json"
PERPLEXITY = "perplexity"


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _export_if_needed(spec: JobSpec, scratch: Path, log) -> Path:
    src_fmt, _ = checkpoint_formats(spec)
    source = Path(spec.checkpoint.source.path)
    if not source.exists():
        raise UserError(f"{source} does not exist", path="checkpoint.source.path")
    if src_fmt == "hf":
        return source
    from qwen_trainer.convert import ConversionError, convert

    target = scratch / "hf"
    log(f"evaluate: exporting {source} ({src_fmt}) to Hugging Face format for evaluation")
    try:
        convert(source, src_fmt, target, "hf", dtype=spec.checkpoint.dtype, progress=False)
    except ConversionError as err:
        raise UserErrors([f"checkpoint.source: {p}" for p in err.problems]) from None
    return target


def _tokenizer_dir(spec: JobSpec, hf_dir: Path) -> str:
    from qwen_trainer.data.tokenizer import has_tokenizer

    for candidate in (spec.model.tokenizer_path, str(hf_dir), spec.checkpoint.source.path):
        if has_tokenizer(candidate):
            return candidate
    raise UserError("no tokenizer found in model.tokenizerPath or the checkpoint", path="model.tokenizerPath")


def perplexity(spec: JobSpec, hf_dir: Path, scratch: Path, log) -> dict[str, float]:
    """Token-level perplexity of the model on the held-out split of data.pretrain."""
    import torch
    from transformers import AutoModelForCausalLM

    from qwen_trainer.data import pretrain
    from qwen_trainer.data.batches import collate
    from qwen_trainer.data.tokenizer import eod_id, load_tokenizer

    if spec.data.pretrain is None:
        raise UserError("the perplexity task reads the validation split of data.pretrain; set it", path="data.pretrain")
    split = spec.data.pretrain.split
    if float(split.split(",")[1]) <= 0:
        raise UserError(f"split {split!r} holds out no validation data for perplexity", path="data.pretrain.split")
    tok = load_tokenizer(_tokenizer_dir(spec, hf_dir))
    arch = resolve_architecture(spec)
    t, ev = spec.training, spec.evaluate
    samples = ev.limit or 256
    splits = pretrain.build(
        [p.path for p in spec.data.pretrain.prefixes], [p.weight for p in spec.data.pretrain.prefixes], split,
        t.seq_length, t.seed, train_samples=1, valid_samples=samples, cache_dir=str(scratch / "index-cache"),
        eod=eod_id(tok), vocab_size=arch.vocab_size, log=log,
    )
    if splits.valid is None:
        raise UserError("the validation split is empty; check data.pretrain.split and the dataset size", path="data.pretrain.split")
    device = _device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(device).eval()
    total_nll, total_tokens = 0.0, 0
    n = min(samples, len(splits.valid))
    with torch.no_grad():
        for start in range(0, n, ev.batch_size):
            batch = collate([splits.valid.sample(i) for i in range(start, min(start + ev.batch_size, n))])
            tokens = torch.as_tensor(batch.tokens, device=device)
            targets = torch.as_tensor(batch.targets, device=device)
            logits = model(input_ids=tokens).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
            total_nll += float(nll)
            total_tokens += int((targets != -100).sum())
    mean = total_nll / max(total_tokens, 1)
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens, "samples": n}


def lm_eval_tasks(spec: JobSpec, hf_dir: Path, tasks: list[str], log) -> dict[str, dict[str, Any]]:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("lm-evaluation-harness is not installed in this image (pip install lm-eval)", path="evaluate.tasks") from None
    ev = spec.evaluate
    manager = TaskManager(include_path=ev.include_path) if ev.include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {ev.include_path}" if ev.include_path else ""
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}: not built into lm-eval{where}", path="evaluate.tasks")
    device = _device()
    log(f"evaluate: lm-eval {', '.join(tasks)} on {device} (batch {ev.batch_size}, few-shot {ev.num_fewshot}, limit {ev.limit})")
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(hf_dir), "dtype": "bfloat16" if device == "cuda" else "float32", "device": device},
        tasks=tasks,
        num_fewshot=ev.num_fewshot,
        batch_size=ev.batch_size,
        limit=ev.limit,
        task_manager=manager,
        random_seed=spec.training.seed,
        numpy_random_seed=spec.training.seed,
        torch_random_seed=spec.training.seed,
        log_samples=False,
    )
    results = {}
    for task, metrics in (out or {}).get("results", {}).items():
        clean = {}
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                clean[key.replace(",none", "")] = value
        results[task] = clean
    return results


def summary(results: dict[str, dict[str, Any]]) -> str:
    parts = []
    for task, metrics in sorted(results.items()):
        for key in ("acc_norm", "acc", "exact_match", "perplexity"):
            if key in metrics:
                parts.append(f"{task} {key}={metrics[key]:.4g}")
                break
    return "; ".join(parts)


def _write_atomically(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(document, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_evaluation(spec: JobSpec, d: DistEnv, log: Callable[[str], None]) -> int:
    if not d.is_main:  # lm-eval and the perplexity pass run in one process
        return 0
    results_dir = Path(spec.checkpoint.output.path) if spec.checkpoint.output else Path(spec.checkpoint.source.path)
    results_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".eval-", dir=results_dir))
    started = time.time()
    try:
        hf_dir = _export_if_needed(spec, scratch, log)
        results: dict[str, dict[str, Any]] = {}
        if PERPLEXITY in spec.evaluate.tasks:
            results[PERPLEXITY] = perplexity(spec, hf_dir, scratch, log)
            log(f"evaluate: perplexity {results[PERPLEXITY]['perplexity']:.3f} over {results[PERPLEXITY]['tokens']} tokens")
        others = [t for t in spec.evaluate.tasks if t != PERPLEXITY]
        if others:
            results.update(lm_eval_tasks(spec, hf_dir, others, log))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    document = {
        "model": spec.checkpoint.source.path,
        "tasks": spec.evaluate.tasks,
        "numFewshot": spec.evaluate.num_fewshot,
        "limit": spec.evaluate.limit,
        "results": results,
        "summary": summary(results),
        "seconds": round(time.time() - started, 1),
    }
    path = results_dir / RESULTS_FILE
    _write_atomically(path, document)
    log(f"evaluate: {document['summary']} (written to {path})")
    _report(document, str(path), log)
    return 0


def _report(document: dict, path: str, log) -> None:
    from qwen_trainer.status_reporter import StatusReporter

    reporter = StatusReporter(log)
    if reporter.enabled:
        reporter.report_section("evaluation", {"results": document["results"], "summary": document["summary"], "file": path})
        reporter.close()
