"""The forward and backward of a whole training step as one CUDA graph (EngineOptions.whole_step_graph).

On one GPU the MoE step is bound by the host: launching its ~2,900 kernels (megatron's MoE layer, the router, the
autograd functions) takes about as long as the GPU takes to run them, so the GPU idles wherever the host falls
behind. Captured once, the step's forward and backward are replayed by one launch.

What a replay cannot change is fixed at capture: the host-side numbers the step bakes into its kernels (each
micro-batch's loss-token count, the global count, the loss mode: the loss normalisation of loss.LossScaling and the
output layer's gradient scale) and every shape. A step is replayed only when these equal the captured step's
(`StepKey`); any other step runs eagerly, exactly as without the graph, and the graph is released (captured again by
the next step) unless captures keep going unused, when capturing stops for the run (`after_mismatch`). The batches
are copied into device buffers the graph reads. The optimizer step stays eager (it is two kernels and its learning rate changes every step).

megatron-core has a whole-iteration graph of its own (full_cuda_graph.FullCudaGraphWrapper); it keeps one graph per
process in class attributes (a second engine in the process would find the first one's), reads batches as dicts,
and replays whatever the host numbers of the step are. This module keeps the graph per engine and checks the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch


@dataclass(frozen=True)
class StepKey:
    """What a captured step fixed on the host: shapes and the loss normalisation's inputs."""

    loss_mode: str
    global_tokens: int
    shapes: tuple[tuple[int, ...], ...]
    loss_tokens: tuple[int, ...]


def step_key(micro_batches: Sequence, loss_mode: str, global_tokens: int) -> StepKey:
    return StepKey(loss_mode, int(global_tokens), tuple(tuple(mb.tokens.shape) for mb in micro_batches),
                   tuple(int(mb.loss_tokens) for mb in micro_batches))


def graph_action(captured: bool, matches: bool, steps_done: int) -> str:
    """What a training step does with the whole-step graph: "replay" it (captured for this step's key), "drop" it
    and run eagerly (captured for another key: StepGraph.drop_for_mismatch), "capture" it (none yet, and an eager
    step has already compiled, tuned and created what the model makes lazily), or run "eager" (the first step)."""
    if captured:
        return "replay" if matches else "drop"
    return "capture" if steps_done >= 1 else "eager"


WASTED_CAPTURES_BEFORE_GIVING_UP = 2


def after_mismatch(replays_since_capture: int, wasted: int) -> tuple[int, bool]:
    """A captured graph met a step of another key and is dropped (its memory pool holds the step's activations,
    which the eager step would need a second time). A capture that was never replayed was wasted; after
    WASTED_CAPTURES_BEFORE_GIVING_UP of them the steps' keys keep changing (SFT batches' loss-token counts do) and
    capturing stops for the run. Returns (wasted captures so far, give up)."""
    wasted += replays_since_capture == 0
    return wasted, wasted >= WASTED_CAPTURES_BEFORE_GIVING_UP


def graph_safe_generators() -> list[torch.Generator]:
    """The states of megatron's RNG tracker, where they are generators (model_parallel_cuda_manual_seed with
    use_cudagraphable_rng): registered with the graph, each replay draws new numbers."""
    from megatron.core.tensor_parallel.random import get_all_rng_states

    return [s for s in get_all_rng_states().values() if isinstance(s, torch.Generator)]


@dataclass
class DeviceMicroBatch:
    """A micro-batch whose tensors live on the GPU at fixed addresses (the graph reads them), with the loss-token
    count the host knew when it was filled (counting on the device would make the host wait inside the capture)."""

    tokens: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    loss_tokens: int

    @classmethod
    def like(cls, mb, device) -> "DeviceMicroBatch":
        return cls(torch.empty_like(mb.tokens, device=device), torch.empty_like(mb.targets, device=device),
                   torch.empty_like(mb.position_ids, device=device), int(mb.loss_tokens))

    def fill(self, mb) -> None:
        self.tokens.copy_(mb.tokens, non_blocking=True)
        self.targets.copy_(mb.targets, non_blocking=True)
        self.position_ids.copy_(mb.position_ids, non_blocking=True)


class StepGraph:
    """One captured step: `capture(fn, micro_batches, key)` records `fn(device_batches)` and runs it once;
    `replay(micro_batches)` runs it again on other batches of the same key (`matches`). Both return `fn`'s result,
    whose tensors are the graph's own memory, rewritten by the next replay: read them (or queue the work that reads
    them) before replaying again."""

    def __init__(self, generators: Sequence[torch.Generator] = ()):
        self.key: Optional[StepKey] = None
        self.replays = 0
        self.given_up = False
        self._replays_since_capture = 0
        self._wasted = 0
        self._generators = list(generators)
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._batches: list[DeviceMicroBatch] = []
        self._result: Any = None

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def matches(self, key: StepKey) -> bool:
        return key == self.key  # None until captured

    def capture(self, fn: Callable[[list], Any], micro_batches: Sequence, key: StepKey) -> Any:
        """Capture `fn` over device copies of `micro_batches`, then run it once by replaying it."""
        device = torch.cuda.current_device()
        self._batches = [DeviceMicroBatch.like(mb, device) for mb in micro_batches]
        graph = torch.cuda.CUDAGraph()
        for gen in self._generators:  # megatron's graph-safe RNG states advance with each replay
            graph.register_generator_state(gen)
        stream = torch.cuda.current_stream()
        if stream == torch.cuda.default_stream():
            raise RuntimeError("the whole-step graph is captured on the side stream the engine moved to before "
                               "building the model; this process still runs on the default stream")
        torch.cuda.synchronize()
        # the capture draws its memory from a pool of its own: hand the eager steps' cached blocks back first, so
        # that a model near the card's memory can still capture (the allocator cannot release them mid-capture)
        torch.cuda.empty_cache()
        # captured on the stream the model was built on: the gradient-accumulation nodes run there (engine.build);
        # thread_local: the autograd engine's device thread launches the backward into the capturing stream
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            result = fn(self._batches)
        self._graph, self._result, self.key = graph, result, key
        out = self.replay(micro_batches)
        self._replays_since_capture = 0  # the capture's own run is not a reuse
        return out

    def replay(self, micro_batches: Sequence) -> Any:
        for dst, src in zip(self._batches, micro_batches):
            dst.fill(src)
        self._graph.replay()
        self.replays += 1
        self._replays_since_capture += 1
        return self._result

    def drop_for_mismatch(self) -> bool:
        """A step of another key came: release the graph (after_mismatch); True when capturing stops for good."""
        self._wasted, self.given_up = after_mismatch(self._replays_since_capture, self._wasted)
        self.release()
        return self.given_up

    def release(self) -> None:
        """Forget the graph (its memory goes back to the allocator once its results are dropped)."""
        self._graph, self._result, self._batches, self.key = None, None, [], None
