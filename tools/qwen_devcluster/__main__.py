"""qwen-devcluster: start, stop or inspect the local control plane for tests and the demo.

``qwen-devcluster up|down|status [--state-dir DIR]`` (also ``python -m qwen_devcluster ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import BinariesMissing, ClusterStartError, down, status, up


def default_state_dir() -> Path:
    cache = os.environ.get("QWEN_K8S_CACHE") or str(Path.home() / ".cache" / "qwen-k8s")
    return Path(cache) / "devcluster" / "default"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qwen-devcluster", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["up", "down", "status"])
    ap.add_argument("--state-dir", type=Path, default=default_state_dir(),
                    help="where the cluster keeps its data, logs and kubeconfig (default: %(default)s)")
    ap.add_argument("--build", action="store_true", help="up: run tools/build-controlplane.sh first")
    ap.add_argument("--nodes", type=int, default=4, help="up: number of fake GPU nodes (default: 4)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--no-training-operator", action="store_true", help="up: skip the training-operator")
    ap.add_argument("--extras", default=os.environ.get("QWEN_CONTROLPLANE_EXTRAS", ""),
                    help="up: comma-separated opt-in controllers to start too: jobset, trainer-v2, kueue "
                         "(default: $QWEN_CONTROLPLANE_EXTRAS; build them with tools/build-controlplane.sh --with-extras)")
    ap.add_argument("--keep-logs", action="store_true", help="down: keep <state-dir>/logs")
    return ap


def run(args: argparse.Namespace) -> int:
    if args.command == "up":
        try:
            c = up(args.state_dir, build=args.build, gpu_nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                   training_operator=not args.no_training_operator,
                   extras=[e for e in args.extras.replace(",", " ").split() if e])
        except (ClusterStartError, BinariesMissing) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        m = c.measure()
        print(f"cluster up in {m['startup_s']}s, {m['total_rss_mib']} MiB RSS; server {c.server}", file=sys.stderr)
        print(f"export KUBECONFIG={c.kubeconfig}")
        return 0
    if args.command == "down":
        if not down(args.state_dir, keep_logs=args.keep_logs):
            print(f"no cluster recorded in {args.state_dir}", file=sys.stderr)
        return 0
    st = status(args.state_dir)
    if st is None:
        print(f"no cluster recorded in {args.state_dir}", file=sys.stderr)
        return 1
    print(json.dumps(st, indent=2))
    return 0 if all(c["alive"] for c in st["components"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a bug, not a user error: say so briefly
        if os.environ.get("QWEN_DEVCLUSTER_DEBUG"):
            raise
        print(f"qwen-devcluster: internal error: {type(err).__name__}: {err} "
              "(set QWEN_DEVCLUSTER_DEBUG=1 for a traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
