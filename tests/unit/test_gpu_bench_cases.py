"""The GPU benchmark's case table: every variant a case lists is defined and builds valid engine options, and
the runner refuses unknown variant names with one line instead of running nothing."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"
sys.path.insert(0, str(BENCH))

from cases import CASES, VARIANTS  # noqa: E402


def test_every_case_names_a_known_baseline():
    assert {c.baseline for c in CASES.values()} <= {"auto", "ddp", "fsdp", "none"}
    # models whose replica does not fit a card are compared against transformers under FSDP2
    assert CASES["qwen3-30b-a3b-ep4-l12"].baseline == CASES["qwen1.5-moe-a2.7b-ep4"].baseline == "fsdp"


def test_every_listed_variant_is_defined():
    missing = {c.name: [v for v in c.variants if v not in VARIANTS] for c in CASES.values()}
    assert not {k: v for k, v in missing.items() if v}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_options_are_engine_options(name):
    pytest.importorskip("megatron.core")
    from trainer.engines.megatron_config import EngineOptions

    fields = {f.name for f in dataclasses.fields(EngineOptions)}
    assert set(VARIANTS[name]) <= fields
    EngineOptions(**VARIANTS[name])


def test_unknown_variant_is_one_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--cases", "smoke-dense", "--variants",
                           "best,no-such-lever", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown variants: no-such-lever" in proc.stderr
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())
