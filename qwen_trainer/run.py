"""`python -m qwen_trainer run --spec FILE`: the entry point every training pod runs (under torchrun).

Every rank reads and validates the spec with the world size from the environment before any rendezvous, so a bad
spec fails on every rank the same way: one `error: <field>: <problem>` line per problem and exit code 2, no
traceback. Crashes print their traceback and exit 1; torchrun then stops the other ranks, so one failing rank
brings the whole job down.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback

from qwen_trainer.errors import EXIT_CRASH, EXIT_USER_ERROR, UserError


def make_logger(rank: int):
    def log(message: str) -> None:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        print(f"[{stamp}] [rank {rank}] {message}", flush=True)

    return log


def _rank_from_env() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def add_arguments(parser) -> None:
    parser.add_argument("--spec", default=os.environ.get("QWEN_JOB_SPEC"),
                        help="job spec YAML: the job spec, a QwenTrainingJob, or the operator's resolved form "
                             "(default: $QWEN_JOB_SPEC)")


def run(args) -> int:
    import warnings

    # megatron-core warns at import that Transformer Engine/Apex are absent; the CPU engine never needs them.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    rank = _rank_from_env()
    log = make_logger(rank)
    try:
        from qwen_trainer import jobfile
        from qwen_trainer.distenv import read_env
        from qwen_trainer.dispatch import run_stage

        if not args.spec:
            raise UserError("no spec file: pass --spec FILE or set QWEN_JOB_SPEC", path="--spec")
        d = read_env()
        rank = d.rank
        log = make_logger(rank)
        job = jobfile.load(args.spec, d.world_size)
        return run_stage(job.spec, d, log)
    except UserError as err:
        for line in err.lines():
            print(f"error: {line}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"error: interrupted (rank {rank})", file=sys.stderr, flush=True)
        return 130
    except Exception as err:
        traceback.print_exc()
        print(f"error: rank {rank} crashed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return EXIT_CRASH
