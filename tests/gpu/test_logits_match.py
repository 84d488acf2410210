"""GPU check: a converted checkpoint computes the same logits in megatron-core as the HF model it came from.

For a dense (Qwen2.5-shaped, tied) and two MoE families (Qwen2-MoE with the sigmoid shared expert, Qwen3-MoE with
q/k norm), build a tiny random HF model, convert it to torch_dist and to the per-rank mcore format, load both into
a megatron-core GPTModel (local layer spec, fp32, one GPU) and compare logits on the same tokens with the fp32 HF
model (eager attention). Prints max/mean absolute differences; fails above 1e-3 (fp32 kernels differ only in
summation order).

Run on a GPU machine: python -m pytest tests/gpu/test_logits_match.py -s
"""

from __future__ import annotations

import os
import tempfile
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
TOLERANCE = 1e-3
warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def megatron_world():
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    created = not dist.is_initialized()
    if created:
        store = tempfile.mkdtemp()
        dist.init_process_group("nccl", init_method=f"file://{os.path.join(store, 's')}", rank=0, world_size=1)
    torch.cuda.set_device(0)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)
    yield
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


def _megatron_logits(ckpt, fmt, tokens):
    from megatron.core import dist_checkpointing

    from qwen_trainer.convert import open_source
    from qwen_trainer.convert.mcore_model import build_gpt_model

    src = open_source(ckpt, fmt)
    dims = src.dims
    src.close()
    model = build_gpt_model(dims, moe_router_dtype="fp32").cuda().eval()
    if fmt == "torch_dist":
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt / "release"))["model"]
    else:
        state = torch.load(ckpt / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)["model"]
    model.load_state_dict(state, strict=True)
    ids = tokens.cuda()
    pos = torch.arange(ids.shape[1], device="cuda").unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        logits = model(ids, pos, attention_mask=None)
    return logits.float()[..., : dims.vocab].cpu()


@pytest.mark.parametrize("family", ["qwen2.5-tied", "qwen2-moe", "qwen3-moe"])
@pytest.mark.parametrize("fmt", ["torch_dist", "mcore"])
def test_logits_match_hf(megatron_world, tmp_path, family, fmt):
    from transformers import AutoModelForCausalLM

    from tests.unit.convert_models import save_tiny
    from qwen_trainer.convert import convert

    hf = save_tiny(family, tmp_path / "hf")
    ckpt = tmp_path / fmt
    convert(hf, "hf", ckpt, fmt, extra_vocab_size=12, progress=False)
    tokens = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    ref_model = AutoModelForCausalLM.from_pretrained(hf, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model.cuda().eval()(tokens.cuda()).logits.float().cpu()
    got = _megatron_logits(ckpt, fmt, tokens)
    diff = (got - ref).abs()
    print(f"\n{family} {fmt}: logits max abs diff {diff.max():.3e}, mean abs diff {diff.mean():.3e}")
    assert diff.max() < TOLERANCE
