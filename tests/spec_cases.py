"""Broken specs, one per validation rule, shared by the unit tests (pydantic + rules) and the integration
tests (CEL and schema checks in a real API server).

Each case starts from a valid base resource, applies a patch, and names the field the error must mention.
`server` says whether the CRD alone (schema or CEL) must reject it at `kubectl apply` time; `numbers`, what its
message must say with the spec's own values.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "manifests" / "examples"


def load_example(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


@dataclass(frozen=True)
class Case:
    id: str
    base: str
    patch: Callable[[dict], None]
    path: str
    server: bool
    numbers: tuple[str, ...] = ()  # fragments of the API server's message that carry the spec's values

    def resource(self) -> dict:
        doc = copy.deepcopy(load_example(self.base))
        self.patch(doc["spec"])
        doc["metadata"]["name"] = f"broken-{self.id}"
        return doc


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def patch(spec: dict) -> None:
        node = spec
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    return patch


def _del(path: str) -> Callable[[dict], None]:
    def patch(spec: dict) -> None:
        node = spec
        parts = path.split(".")
        for part in parts[:-1]:
            node = node[part]
        node.pop(parts[-1], None)

    return patch


def _all(*patches: Callable[[dict], None]) -> Callable[[dict], None]:
    def patch(spec: dict) -> None:
        for p in patches:
            p(spec)

    return patch


MOE = "qwen-moe-pretrain.yaml"  # megablocks, 8 GPUs, EP 8
DENSE = "mcore-dense-pretrain.yaml"  # qwen1.5 7B, TP 2, 8 GPUs
SFT = "mcore-dense-finetune.yaml"
QWEN2 = _all(_set("model.family", "qwen2"), _set("model.size", "0.5B"))

CASES: tuple[Case, ...] = (
    Case("tp-heads", DENSE, _all(QWEN2, _set("parallelism.tensor", 4), _set("resources.gpusPerNode", 8)), "spec.parallelism.tensor", False),
    Case("tp-groups", DENSE, _all(QWEN2, _set("parallelism.tensor", 7), _set("resources.gpusPerNode", 7)), "spec.parallelism.tensor", False),
    Case("tp-vocab", DENSE, _set("model.architecture", {"vocabSize": 151937}), "spec.parallelism.tensor", False),
    Case("gqa-groups", DENSE, _set("model.architecture", {"numQueryGroups": 3}), "spec.model.architecture.numQueryGroups", False),
    Case("pp-layers", DENSE, _all(_set("parallelism.pipeline", 3), _set("parallelism.tensor", 1), _set("parallelism.sequenceParallel", False), _set("resources.gpusPerNode", 6), _set("training.globalBatchSize", 32)), "spec.parallelism.pipeline", False),
    Case("first-stage-pp1", DENSE, _set("parallelism.firstStageLayers", 4), "spec.parallelism.firstStageLayers", True,
         ("pipeline parallel size > 1, not 1",)),
    Case("vpp-pp1", DENSE, _set("parallelism.virtualPipelineLayers", 2), "spec.parallelism.virtualPipelineLayers", True,
         ("pipeline parallel size > 1, not 1",)),
    Case("experts-ep", MOE, _all(_set("parallelism.expert", 3), _set("resources.gpusPerNode", 6), _set("training.globalBatchSize", 6)), "spec.parallelism.expert", True,
         ("expert parallel size 3 must divide the 8 experts",)),
    Case("dense-ep", DENSE, _set("parallelism.expert", 2), "spec.parallelism.expert", False),
    Case("topk", MOE, _set("model.moe.topK", 9), "spec.model.moe.topK", True, ("topK 9 must not exceed the 8 experts",)),
    Case("world-mp", DENSE, _set("resources.gpusPerNode", 3), "spec.resources.gpusPerNode", True,
         ("3 processes are not a multiple of tensor 2 x pipeline 1 x context 1",)),
    Case("world-expert", MOE, _all(_set("resources.gpusPerNode", 4), _set("training.globalBatchSize", 8)), "spec.parallelism.expert", True,
         ("4 processes are not a multiple of pipeline 1 x expert 8 x expertTensor 1",)),
    Case("gbs-dp", DENSE, _set("training.globalBatchSize", 6), "spec.training.globalBatchSize", True,
         ("global batch size 6 is not a multiple of micro batch", "data parallel size 4")),
    Case("sp-tp1", MOE, _set("parallelism.sequenceParallel", True), "spec.parallelism.sequenceParallel", True,
         ("tensor parallel size > 1, not 1",)),
    Case("megablocks-do", MOE, _set("parallelism.distributedOptimizer", True), "spec.parallelism.distributedOptimizer", True),
    Case("megablocks-te", MOE, _set("training.transformerEngine", True), "spec.training.transformerEngine", True),
    Case("megablocks-dense", MOE, _del("model.moe"), "spec.model.moe.numExperts", False),
    Case("megablocks-ep-dp", MOE, _set("parallelism.expert", 4), "spec.parallelism.expert", False),
    Case("mlm-moe", "mlm-dense-pretrain.yaml", _set("model.size", "A2.7B"), "spec.model.backend", False),
    Case("fp8-te", MOE, _set("training.precision", "fp8"), "spec.training.precision", True),
    Case("tp-overlap", MOE, _set("parallelism.tpCommOverlap", True), "spec.parallelism.tpCommOverlap", True),
    Case("expert-grad-memory", MOE, _set("training.expertGradientMemoryMiB", -1), "spec.training.expertGradientMemoryMiB",
         True),
    Case("offload-moe", MOE, _set("training.optimizerOffloadFraction", 0.5), "spec.training.optimizerOffloadFraction", True),
    # valid for Megatron (TE, sequence parallel, distributed optimizer) but not carried out by this trainer yet
    Case("tp-overlap-unsupported", DENSE, _set("parallelism.tpCommOverlap", True), "spec.parallelism.tpCommOverlap", True),
    Case("offload-unsupported", DENSE, _set("training.optimizerOffloadFraction", 0.5), "spec.training.optimizerOffloadFraction", True),
    Case("two-lengths", DENSE, _set("training.trainIters", 100), "spec.training", True),
    Case("warmup-basis", DENSE, _set("training.warmupIters", 10), "spec.training", True),
    Case("too-short", DENSE, _set("training.trainTokens", 1000), "spec.training", False),
    Case("min-lr", DENSE, _set("training.minLr", 1.0), "spec.training.minLr", True, ("minLr 1", "must not exceed lr")),
    Case("packing-mbs", SFT, _all(_set("data.sft.packing", True), _set("training.microBatchSize", 2), _set("training.globalBatchSize", 64)), "spec.data.sft.packing", True,
         ("context parallel size 1, not 2 and 1",)),
    Case("recompute-layers", DENSE, _set("training.activationCheckpointing", {"mode": "full", "layers": 5}), "spec.training.activationCheckpointing.layers", False),
    Case("cp-seq", DENSE, _all(_set("parallelism.context", 2), _set("training.seqLength", 4098)), "spec.training.seqLength", True,
         ("seqLength 4098 is not a multiple of 2 x context parallel size 2",)),
    Case("pretrain-data", DENSE, _del("data.pretrain"), "spec.data.pretrain", True),
    Case("pretrain-length", DENSE, _all(_del("training.trainTokens"), _del("training.warmupTokens")), "spec.training.trainTokens", True),
    Case("finetune-data", SFT, _del("data.sft"), "spec.data.sft", True),
    Case("finetune-length", SFT, _all(_del("training.trainIters"), _del("training.warmupIters")), "spec.training.trainIters", True),
    Case("output-missing", DENSE, _del("checkpoint.output"), "spec.checkpoint.output", True),
    Case("convert-source", "mcore-dense-convert.yaml", _del("checkpoint.source"), "spec.checkpoint.source", True),
    Case("export-format", "export-hf.yaml", _set("checkpoint.output.format", "mcore"), "spec.checkpoint.output.format", False),
    Case("convert-hf-hf", "mcore-dense-convert.yaml", _set("checkpoint.output.format", "hf"), "spec.checkpoint.output.format", False),
    Case("eval-tasks", "evaluate.yaml", _set("evaluate.tasks", []), "spec.evaluate.tasks", True),
    Case("upcycle-moe-preset", "megablocks-convert.yaml", _set("model.size", "A2.7B"), "spec.model.moe.upcycling", False),
    Case("negative-lr", DENSE, _set("training.lr", -1.0), "spec.training.lr", True),
    Case("zero-mbs", DENSE, _set("training.microBatchSize", 0), "spec.training.microBatchSize", True),
    Case("relative-path", DENSE, _set("checkpoint.output.path", "output/run1"), "spec.checkpoint.output.path", True),
    Case("bad-family", DENSE, _set("model.family", "qwen9"), "spec.model.family", True),
    Case("bad-size", DENSE, _set("model.size", "9000B"), "spec.model.size", True),
    Case("bad-precision", DENSE, _set("training.precision", "fp4"), "spec.training.precision", True),
    Case("unknown-field", DENSE, _set("training.learningRate", 0.1), "spec.training.learningRate", True),
    Case("bad-quantity", DENSE, _set("resources.sharedMemory", "lots"), "spec.resources.sharedMemory", True),
    Case("missing-model", DENSE, _del("model"), "spec.model", True),
)
