"""`python -m qwen_trainer <command>`: one subcommand per concern, each registered by its own module."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from .errors import install_error_lines, write_termination_log

    errors = install_error_lines()
    code = 1
    try:
        code = _main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        raise
    finally:
        errors.flush()
        sys.stderr = errors.stream
        if code:
            write_termination_log(errors.lines)
    return code


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen_trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    from .convert.cli import add_parser as add_convert

    add_convert(sub)
    _add_run(sub)
    _add_data(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def _add_run(sub) -> None:
    from . import run

    p = sub.add_parser("run", help="run the stage a job spec describes (the training pods' command)")
    run.add_arguments(p)
    p.set_defaults(func=run.run)


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    pre = data_sub.add_parser("preprocess", help="jsonl -> Megatron .bin/.idx with the Qwen tokenizer")
    from .data import preprocess

    preprocess.add_arguments(pre)
    pre.set_defaults(func=_preprocess)


def _preprocess(args) -> int:
    from .data import preprocess
    from .errors import EXIT_USER_ERROR, UserError

    try:
        return preprocess.run(args)
    except UserError as err:
        for line in err.lines():
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
