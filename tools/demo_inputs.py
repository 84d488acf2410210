"""The demo's inputs, made on this machine: the bundled corpus tokenised, an SFT set, and a random Hugging
Face checkpoint of the tiny Qwen1.5-MoE shape of manifests/examples/cpu-*.yaml. Used by `make demo` (its
`qwenctl run --local` part and its kind part) and by tests/kind, which put them on the shared volume.

Layout under <root>/data: tokenizer/, corpus/tiny_text_document.{bin,idx}, sft/train.json, tiny-moe-hf/.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "manifests" / "examples"


def prepare_data(root: Path, say: Callable[[str, str], None] = lambda tag, text: None) -> Path:
    """Writes the inputs under root/data and returns that folder."""
    from qwen_trainer.data.synthetic import make_demo_data
    from qwen_trainer.engines.hf_model import build_model, hf_config
    from qwen_trainer.spec import resolve_architecture
    from qwen_operator.api import validate_resource_spec

    data = root / "data"
    made = make_demo_data(data, vocab_size=512, sft_samples=64, corpus_repeat=2)
    (data / "sft").mkdir(exist_ok=True)
    shutil.copy(made["sft"], data / "sft" / "train.json")
    (data / "corpus").mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "qwen_trainer", "data", "preprocess", "--input", made["corpus"],
                    "--output-prefix", str(data / "corpus" / "tiny"), "--tokenizer", made["tokenizer"],
                    "--json-key", "text", "--workers", "2", "--no-progress"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    say("REAL", f"bundled corpus tokenised into {data / 'corpus' / 'tiny_text_document'}.bin/.idx")

    import torch

    spec = validate_resource_spec(yaml.safe_load((EXAMPLES / "cpu-convert.yaml").read_text())["spec"])
    arch = resolve_architecture(spec.job_spec())
    torch.manual_seed(0)
    model = build_model(hf_config(arch))
    hf_dir = data / "tiny-moe-hf"
    model.save_pretrained(hf_dir)
    for f in Path(made["tokenizer"]).iterdir():
        shutil.copy(f, hf_dir / f.name)
    params = sum(p.numel() for p in model.parameters())
    say("REAL", f"random Hugging Face checkpoint of the tiny Qwen1.5-MoE shape ({arch.moe.num_experts} experts, "
                f"top-{arch.moe.top_k}, {params:,} parameters) in {hf_dir}")
    return data
