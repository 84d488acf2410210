"""Cross-field validation rules, declared once.

Each rule names the field it reports on (wire path relative to the job spec), says its rule in words, checks
it in Python against the resolved spec, and, where CEL can express it, carries the CEL expression that the CRD
puts in `x-kubernetes-validations` so `kubectl apply` rejects the spec server-side. The placeholder `{world}`
in a CEL expression stands for the total number of processes, which only the Kubernetes resource knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .job import JobSpec
from .resolve import ResolvedArchitecture, checkpoint_formats, resolve_architecture, schedule


@dataclass(frozen=True)
class Context:
    spec: JobSpec
    arch: ResolvedArchitecture
    world_size: Optional[int]
    gpus_per_node: Optional[int] = None

    @property
    def p(self):
        return self.spec.parallelism

    @property
    def t(self):
        return self.spec.training

    @property
    def data_parallel(self) -> Optional[int]:
        mp = self.p.tensor * self.p.pipeline * self.p.context
        if self.world_size is None or self.world_size % mp:
            return None
        return self.world_size // mp


@dataclass(frozen=True)
class Rule:
    path: str
    summary: str
    check: Callable[[Context], Optional[str]]  # returns a message when the rule is broken
    cel: Optional[str] = None
    needs_world: bool = False
    needs_gpus: bool = False
    # The API server's message with the numbers: a CEL format string (``%s`` for each value) and the CEL
    # expressions of its values. Format, not ``+`` with ``string()``: the API server's cost estimate treats a
    # converted number as unbounded text and refuses the concatenation.
    cel_message: Optional[tuple[str, tuple[str, ...]]] = None


def _describe(ctx: Context) -> str:
    return f"{ctx.spec.model.family} {ctx.spec.model.size}"


def _tp_divides_groups(c: Context):
    g, tp = c.arch.num_query_groups, c.p.tensor
    if g % tp:
        return f"tensor parallel size {tp} must divide the {g} query groups of {_describe(c)}"


def _tp_divides_heads(c: Context):
    h, tp = c.arch.num_attention_heads, c.p.tensor
    if h % tp:
        return f"tensor parallel size {tp} must divide the {h} attention heads of {_describe(c)}"


def _groups_divide_heads(c: Context):
    h, g = c.arch.num_attention_heads, c.arch.num_query_groups
    if h % g:
        return f"the {g} query groups must divide the {h} attention heads"


def _tp_divides_vocab(c: Context):
    v, tp = c.arch.vocab_size, c.p.tensor
    if v % tp:
        return f"tensor parallel size {tp} must divide the padded vocabulary of {v}"


def _pipeline_layers(c: Context):
    layers, pp, first = c.arch.num_layers, c.p.pipeline, c.p.first_stage_layers
    if first is None:
        if layers % pp:
            return f"pipeline parallel size {pp} must divide the {layers} layers (or set parallelism.firstStageLayers)"
        return None
    if pp > 1 and (first >= layers or (layers - first) % (pp - 1)):
        return f"the {layers - first} layers after the first stage must split evenly over the other {pp - 1} stages"


def _first_stage_needs_pp(c: Context):
    if c.p.first_stage_layers is not None and c.p.pipeline < 2:
        return "firstStageLayers needs pipeline parallel size > 1"


def _vpp(c: Context):
    v = c.p.virtual_pipeline_layers
    if v is None:
        return None
    if c.p.pipeline < 2:
        return "virtualPipelineLayers needs pipeline parallel size > 1"
    per_stage = c.arch.num_layers // c.p.pipeline
    if c.p.first_stage_layers is None and per_stage % v:
        return f"virtualPipelineLayers {v} must divide the {per_stage} layers per pipeline stage"


def _experts_divisible(c: Context):
    if c.arch.moe is None:
        if c.p.expert > 1 or c.p.expert_tensor > 1:
            return "expert parallelism needs an MoE model (a MoE size or model.moe.numExperts)"
        return None
    e, ep = c.arch.moe.num_experts, c.p.expert
    if e % ep:
        return f"expert parallel size {ep} must divide the {e} experts"


def _topk(c: Context):
    m = c.arch.moe
    if m is not None and m.top_k > m.num_experts:
        return f"topK {m.top_k} exceeds the {m.num_experts} experts"


def _processes(c: Context) -> str:
    """How the world size came about, in words (it counts processes, which are GPUs only when there are GPUs)."""
    if c.gpus_per_node is None:
        return "nodes x processes per node"
    if c.gpus_per_node == 0:
        return "nodes x processesPerNode, on CPU: gpusPerNode is 0"
    return f"nodes x {c.gpus_per_node} GPUs per node"


TRAINING_STAGES = ("pretrain", "finetune")


def _gpu_features(c: Context):
    if c.gpus_per_node != 0 or c.spec.stage not in TRAINING_STAGES:
        return None
    wanted = [name for name, on in (("training.transformerEngine", c.t.transformer_engine),
                                    ("training.flashAttention", c.t.flash_attention is True),
                                    ("training.precision fp8", c.t.precision == "fp8")) if on]
    if wanted:
        return (f"the {c.spec.stage} stage on CPU (resources.gpusPerNode is 0) cannot use {', '.join(wanted)}: "
                f"{c.spec.model.backend} runs them on GPUs only; set resources.gpusPerNode, or turn them off to "
                "train on CPU")


def _world_model_parallel(c: Context):
    mp = c.p.tensor * c.p.pipeline * c.p.context
    if c.world_size % mp:
        return (f"the {c.world_size} processes ({_processes(c)}) must be a multiple of tensor x pipeline x context"
                f" = {c.p.tensor} x {c.p.pipeline} x {c.p.context} = {mp}")


def _world_expert(c: Context):
    block = c.p.pipeline * c.p.expert * c.p.expert_tensor
    if c.world_size % block:
        return (
            f"the {c.world_size} processes ({_processes(c)}) must be a multiple of pipeline x expert x expertTensor"
            f" = {c.p.pipeline} x {c.p.expert} x {c.p.expert_tensor} = {block}"
            " (megatron-core folds expert parallelism into the data-parallel ranks)"
        )


def _global_batch(c: Context):
    dp = c.data_parallel
    if dp is None:
        return None
    step = c.t.micro_batch_size * dp
    if c.t.global_batch_size % step:
        return (
            f"global batch size {c.t.global_batch_size} must be a multiple of micro batch size x data parallel"
            f" size = {c.t.micro_batch_size} x {dp} = {step}"
        )


def _sequence_parallel(c: Context):
    if c.p.sequence_parallel and c.p.tensor < 2:
        return "sequence parallelism needs tensor parallel size > 1"


def _megablocks_dist_opt(c: Context):
    if c.spec.model.backend == "megablocks" and c.p.distributed_optimizer:
        return "megablocks does not support the distributed optimizer; set parallelism.distributedOptimizer: false"


def _megablocks_te(c: Context):
    if c.spec.model.backend == "megablocks" and c.t.transformer_engine:
        return "megablocks does not support Transformer Engine; set training.transformerEngine: false"


def _megablocks_moe(c: Context):
    if c.spec.model.backend == "megablocks" and c.arch.moe is None:
        return "the megablocks backend trains an MoE model: set model.moe.numExperts (and upcycling for a dense source)"


def _megablocks_ep(c: Context):
    if c.spec.model.backend != "megablocks" or c.p.expert == 1:
        return None
    dp = c.data_parallel
    if dp is not None and c.p.expert != dp:
        return f"megablocks shards experts over the whole data-parallel group: expert must be 1 or {dp}"


def _megatron_lm_dense(c: Context):
    if c.spec.model.backend == "megatron-lm" and c.arch.moe is not None:
        return "the megatron-lm backend trains dense models; use megatron-core or megablocks for MoE"


def _fp8_needs_te(c: Context):
    if c.t.precision == "fp8" and not c.t.transformer_engine:
        return "fp8 needs Transformer Engine; set training.transformerEngine: true"


# Valid Megatron settings from the guide's scripts that this trainer does not carry out yet: refused when the
# resource is applied rather than ignored when the pods run. (Megatron's own conditions on them, Transformer Engine
# with sequence parallelism for the overlap and the distributed optimizer for the offload, return with the wiring.)
def _tp_overlap_unsupported(c: Context):
    if c.p.tp_comm_overlap:
        return ("tpCommOverlap is not carried out by this trainer yet (it needs Transformer Engine's userbuffers, "
                "which the engine does not set up); set it false")


def _offload_unsupported(c: Context):
    if c.t.optimizer_offload_fraction > 0:
        return ("optimizer state in host memory is not carried out by this trainer yet; "
                "set optimizerOffloadFraction to 0")


def _one_length(c: Context):
    given = [n for n, v in (("trainTokens", c.t.train_tokens), ("trainIters", c.t.train_iters), ("epochs", c.t.epochs)) if v is not None]
    if len(given) > 1:
        return f"set only one of trainTokens, trainIters, epochs (got {', '.join(given)})"


def _warmup_basis(c: Context):
    if c.t.warmup_tokens is not None and c.t.train_tokens is None:
        return "warmupTokens goes with trainTokens; use warmupIters with trainIters or epochs"
    if c.t.warmup_iters is not None and c.t.train_tokens is not None:
        return "warmupIters goes with trainIters or epochs; use warmupTokens with trainTokens"


def _train_tokens_enough(c: Context):
    s = schedule(c.spec)
    if s.basis == "tokens" and s.train_iters == 0:
        return "trainTokens is less than one step (globalBatchSize x seqLength tokens)"
    if s.train_iters is not None and s.warmup_iters >= s.train_iters:
        return f"warmup ({s.warmup_iters} steps) must be shorter than training ({s.train_iters} steps)"


def _min_lr(c: Context):
    if c.t.min_lr > c.t.lr:
        return f"minLr {c.t.min_lr} must not exceed lr {c.t.lr}"


def _packing(c: Context):
    sft = c.spec.data.sft
    if sft is not None and sft.packing and (c.t.micro_batch_size != 1 or c.p.context != 1):
        return "SFT packing needs microBatchSize 1 and context parallel size 1"


def _recompute_layers(c: Context):
    ac = c.t.activation_checkpointing
    per_stage = c.arch.num_layers // c.p.pipeline
    if ac.mode in ("full", "offload") and per_stage % ac.layers:
        return f"activationCheckpointing.layers {ac.layers} must divide the {per_stage} layers per pipeline stage"


def _context_seq(c: Context):
    if c.p.context > 1 and c.t.seq_length % (2 * c.p.context):
        return f"seqLength {c.t.seq_length} must be a multiple of 2 x context parallel size"


def _stage_needs(stage: str, what: str, present: Callable[[JobSpec], bool]):
    def check(c: Context):
        if c.spec.stage == stage and not present(c.spec):
            return f"the {stage} stage needs {what}"

    return check


def _length_given(s: JobSpec) -> bool:
    return any(v is not None for v in (s.training.train_tokens, s.training.train_iters, s.training.epochs))


def _formats(c: Context):
    src, out = checkpoint_formats(c.spec)
    stage = c.spec.stage
    if stage == "convert" and src == out == "hf":
        return "convert needs a Megatron format on one side; to reshard Hugging Face weights there is nothing to do"
    if stage == "export" and out != "hf":
        return "export writes Hugging Face format; checkpoint.output.format must be hf"
    if stage == "export" and src == "hf":
        return "export reads a Megatron-format checkpoint; checkpoint.source.format must not be hf"


def _upcycling(c: Context):
    moe = c.spec.model.moe
    if moe is None or not moe.upcycling.enabled:
        return None
    if moe.num_experts is None:
        return "upcycling needs model.moe.numExperts"
    if c.spec.model.size.startswith("A"):
        return "upcycling starts from a dense size, not an MoE preset"
    if c.spec.stage != "convert":
        return "upcycling happens during conversion; set it on the convert stage"


S = "self"
RULES: tuple[Rule, ...] = (
    Rule("parallelism.tensor", "tensor parallel size must divide the attention heads", _tp_divides_heads),
    Rule("parallelism.tensor", "tensor parallel size must divide the query groups", _tp_divides_groups),
    Rule("model.architecture.numQueryGroups", "query groups must divide the attention heads", _groups_divide_heads),
    Rule("parallelism.tensor", "tensor parallel size must divide the padded vocabulary", _tp_divides_vocab),
    Rule("parallelism.pipeline", "pipeline stages must split the layers evenly", _pipeline_layers),
    Rule(
        "parallelism.firstStageLayers",
        "firstStageLayers needs pipeline parallel size > 1",
        _first_stage_needs_pp,
        f"!has({S}.parallelism.firstStageLayers) || {S}.parallelism.pipeline > 1",
        cel_message=("firstStageLayers needs pipeline parallel size > 1, not %s", (f"{S}.parallelism.pipeline",)),
    ),
    Rule("parallelism.virtualPipelineLayers", "virtual pipeline needs pipeline > 1 and must divide the stage's layers", _vpp,
         f"!has({S}.parallelism.virtualPipelineLayers) || {S}.parallelism.pipeline > 1",
         cel_message=("virtualPipelineLayers needs pipeline parallel size > 1, not %s", (f"{S}.parallelism.pipeline",))),
    Rule("parallelism.expert", "expert parallel size must divide the experts", _experts_divisible,
         f"!has({S}.model.moe) || !has({S}.model.moe.numExperts) || {S}.model.moe.numExperts % {S}.parallelism.expert == 0",
         cel_message=("expert parallel size %s must divide the %s experts",
                      (f"{S}.parallelism.expert", f"{S}.model.moe.numExperts"))),
    Rule("model.moe.topK", "topK must not exceed the number of experts", _topk,
         f"!has({S}.model.moe) || !has({S}.model.moe.numExperts) || !has({S}.model.moe.topK) || {S}.model.moe.topK <= {S}.model.moe.numExperts",
         cel_message=("topK %s must not exceed the %s experts", (f"{S}.model.moe.topK", f"{S}.model.moe.numExperts"))),
    Rule("resources.gpusPerNode", "GPUs must be a multiple of tensor x pipeline x context", _world_model_parallel,
         f"({{world}}) % ({S}.parallelism.tensor * {S}.parallelism.pipeline * {S}.parallelism.context) == 0", needs_world=True,
         cel_message=("%s processes are not a multiple of tensor %s x pipeline %s x context %s",
                      ("{world}", f"{S}.parallelism.tensor", f"{S}.parallelism.pipeline", f"{S}.parallelism.context"))),
    Rule("parallelism.expert", "GPUs must be a multiple of pipeline x expert x expertTensor", _world_expert,
         f"({{world}}) % ({S}.parallelism.pipeline * {S}.parallelism.expert * {S}.parallelism.expertTensor) == 0", needs_world=True,
         cel_message=("%s processes are not a multiple of pipeline %s x expert %s x expertTensor %s",
                      ("{world}", f"{S}.parallelism.pipeline", f"{S}.parallelism.expert", f"{S}.parallelism.expertTensor"))),
    Rule("training.globalBatchSize", "global batch size must be a multiple of micro batch x data parallel size", _global_batch,
         f"({{world}}) % ({S}.parallelism.tensor * {S}.parallelism.pipeline * {S}.parallelism.context) != 0 || "
         f"{S}.training.globalBatchSize % ({S}.training.microBatchSize * (({{world}}) / ({S}.parallelism.tensor * {S}.parallelism.pipeline * {S}.parallelism.context))) == 0",
         needs_world=True,
         cel_message=("global batch size %s is not a multiple of micro batch %s x data parallel size %s",
                      (f"{S}.training.globalBatchSize", f"{S}.training.microBatchSize",
                       f"({{world}}) / ({S}.parallelism.tensor * {S}.parallelism.pipeline * {S}.parallelism.context)"))),
    Rule("resources.gpusPerNode", "training on CPU (gpusPerNode 0) cannot use Transformer Engine, flash attention or fp8",
         _gpu_features,
         f"!has({S}.stage) || !({S}.stage in {list(TRAINING_STAGES)}) || ({{gpus}}) > 0 || "
         f"(!{S}.training.transformerEngine && {S}.training.precision != 'fp8' && "
         f"(!has({S}.training.flashAttention) || !{S}.training.flashAttention))", needs_gpus=True),
    Rule("parallelism.sequenceParallel", "sequence parallelism needs tensor parallel size > 1", _sequence_parallel,
         f"!{S}.parallelism.sequenceParallel || {S}.parallelism.tensor > 1",
         cel_message=("sequence parallelism needs tensor parallel size > 1, not %s", (f"{S}.parallelism.tensor",))),
    Rule("parallelism.distributedOptimizer", "megablocks does not support the distributed optimizer", _megablocks_dist_opt,
         f"{S}.model.backend != 'megablocks' || !{S}.parallelism.distributedOptimizer"),
    Rule("training.transformerEngine", "megablocks does not support Transformer Engine", _megablocks_te,
         f"{S}.model.backend != 'megablocks' || !{S}.training.transformerEngine"),
    Rule("model.moe.numExperts", "the megablocks backend needs an MoE model", _megablocks_moe),
    Rule("parallelism.expert", "megablocks expert parallelism spans the data-parallel group", _megablocks_ep),
    Rule("model.backend", "the megatron-lm backend trains dense models", _megatron_lm_dense),
    Rule("training.precision", "fp8 needs Transformer Engine", _fp8_needs_te,
         f"{S}.training.precision != 'fp8' || {S}.training.transformerEngine"),
    Rule("parallelism.tpCommOverlap", "tpCommOverlap is not carried out by this trainer yet", _tp_overlap_unsupported,
         f"!{S}.parallelism.tpCommOverlap"),
    Rule("training.optimizerOffloadFraction", "optimizer offload is not carried out by this trainer yet",
         _offload_unsupported, f"{S}.training.optimizerOffloadFraction == 0.0"),
    Rule("training", "set only one of trainTokens, trainIters, epochs", _one_length,
         f"[has({S}.training.trainTokens), has({S}.training.trainIters), has({S}.training.epochs)].filter(x, x).size() <= 1"),
    Rule("training", "warmupTokens goes with trainTokens, warmupIters with trainIters or epochs", _warmup_basis,
         f"(!has({S}.training.warmupTokens) || has({S}.training.trainTokens)) && (!has({S}.training.warmupIters) || !has({S}.training.trainTokens))"),
    Rule("training", "training must last at least one step beyond warmup", _train_tokens_enough),
    Rule("training.minLr", "minLr must not exceed lr", _min_lr, f"{S}.training.minLr <= {S}.training.lr",
         cel_message=("minLr %s must not exceed lr %s", (f"{S}.training.minLr", f"{S}.training.lr"))),
    Rule("data.sft.packing", "SFT packing needs microBatchSize 1 and context parallel size 1", _packing,
         f"!has({S}.data.sft) || !{S}.data.sft.packing || ({S}.training.microBatchSize == 1 && {S}.parallelism.context == 1)",
         cel_message=("SFT packing needs microBatchSize 1 and context parallel size 1, not %s and %s",
                      (f"{S}.training.microBatchSize", f"{S}.parallelism.context"))),
    Rule("training.activationCheckpointing.layers", "recompute layers must divide the layers per stage", _recompute_layers),
    Rule("training.seqLength", "seqLength must be a multiple of 2 x context parallel size", _context_seq,
         f"{S}.parallelism.context == 1 || {S}.training.seqLength % (2 * {S}.parallelism.context) == 0",
         cel_message=("seqLength %s is not a multiple of 2 x context parallel size %s",
                      (f"{S}.training.seqLength", f"{S}.parallelism.context"))),
    Rule("data.pretrain", "the pretrain stage needs data.pretrain", _stage_needs("pretrain", "data.pretrain", lambda s: s.data.pretrain is not None),
         f"{S}.stage != 'pretrain' || has({S}.data.pretrain)"),
    Rule("data.sft", "the finetune stage needs data.sft", _stage_needs("finetune", "data.sft", lambda s: s.data.sft is not None),
         f"{S}.stage != 'finetune' || has({S}.data.sft)"),
    Rule("training.trainTokens", "pretrain needs trainTokens or trainIters",
         _stage_needs("pretrain", "training.trainTokens or training.trainIters",
                      lambda s: s.training.train_tokens is not None or s.training.train_iters is not None),
         f"{S}.stage != 'pretrain' || has({S}.training.trainTokens) || has({S}.training.trainIters)"),
    Rule("training.trainIters", "finetune needs trainIters, epochs or trainTokens", _stage_needs("finetune", "training.trainIters, training.epochs or training.trainTokens", _length_given),
         f"{S}.stage != 'finetune' || has({S}.training.trainTokens) || has({S}.training.trainIters) || has({S}.training.epochs)"),
    *(
        Rule("checkpoint.output", f"the {st} stage needs checkpoint.output",
             _stage_needs(st, "checkpoint.output", lambda s: s.checkpoint.output is not None),
             f"{S}.stage != '{st}' || has({S}.checkpoint.output)")
        for st in ("convert", "pretrain", "finetune", "export")
    ),
    *(
        Rule("checkpoint.source", f"the {st} stage needs checkpoint.source",
             _stage_needs(st, "checkpoint.source", lambda s: s.checkpoint.source is not None),
             f"{S}.stage != '{st}' || has({S}.checkpoint.source)")
        for st in ("convert", "export", "evaluate")
    ),
    Rule("evaluate.tasks", "the evaluate stage needs evaluate.tasks",
         _stage_needs("evaluate", "at least one task in evaluate.tasks", lambda s: len(s.evaluate.tasks) > 0),
         f"{S}.stage != 'evaluate' || size({S}.evaluate.tasks) > 0"),
    Rule("checkpoint.output.format", "the stage's checkpoint formats must fit it", _formats),
    Rule("model.moe.upcycling", "upcycling is a conversion of a dense size into numExperts experts", _upcycling),
)


def check_rules(spec: JobSpec, world_size: Optional[int] = None,
                gpus_per_node: Optional[int] = None) -> list[tuple[str, str]]:
    """Every broken rule as (path, message), in declaration order. Rules about the world size or the GPUs are
    checked only when those are known (the Kubernetes resource knows them; a bare job spec does not)."""
    ctx = Context(spec, resolve_architecture(spec), world_size, gpus_per_node)
    problems: list[tuple[str, str]] = []
    for rule in RULES:
        if (rule.needs_world and world_size is None) or (rule.needs_gpus and gpus_per_node is None):
            continue
        message = rule.check(ctx)
        if message:
            problems.append((rule.path, message))
    return problems


def cel_rules(world_expression: str, gpus_expression: str = "self.resources.gpusPerNode") -> list[dict]:
    """The CEL-expressible rules as x-kubernetes-validations entries for the object holding the job spec."""
    out = []
    def fill(expression: str) -> str:
        return expression.replace("{world}", world_expression).replace("{gpus}", gpus_expression)

    for rule in RULES:
        if rule.cel is None:
            continue
        entry = {
            "rule": fill(rule.cel),
            "message": f"{rule.path}: {rule.summary}",
            "fieldPath": "." + rule.path,
            "reason": "FieldValueInvalid",
        }
        if rule.cel_message is not None:
            text, values = rule.cel_message
            entry["messageExpression"] = f"'{rule.path}: {text}'.format([{', '.join(fill(v) for v in values)}])"
        out.append(entry)
    return out
