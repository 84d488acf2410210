"""`python tools/qwen_kind images|up|down`: build the images, start or delete the kind cluster.

`up` leaves the cluster running and prints its kubeconfig; `down` deletes it and stops a dockerd `up` started.
The tests in tests/kind start and stop their own, or run on one `up` left (QWEN_KIND_ATTACH, tools/run-tests.sh).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_kind import cluster as kind_cluster, images  # noqa: E402
from qwen_kind.docker import ensure_docker, stop_daemon_we_started  # noqa: E402
from qwen_kind.errors import KindSetupError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen_kind", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("images", "up", "down"))
    parser.add_argument("--name", default="qwen-e2e")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, help="folder for the kubeconfig and the shared volume (up)")
    parser.add_argument("--namespace", action="append", default=[],
                        help="namespace to create with the trainer ServiceAccount (up; repeatable)")
    parser.add_argument("--trainjob", metavar="NS", default=None,
                        help="up: also JobSet and Kubeflow Trainer v2, and the chart with jobApi trainjob watching "
                             "namespace NS (the first release then watches only the --namespace ones)")
    args = parser.parse_args(argv)
    try:
        if args.command == "images":
            cache = kind_cluster.cache_dir()
            docker = ensure_docker(cache)
            try:
                bin_dir = kind_cluster.controlplane_bin_dir()
                images.base_image(docker, cache)
                images.python_base(docker)
                refs = images.component_images(docker, bin_dir, cache)
                refs["node"] = images.node_image(docker, bin_dir, cache, refs)
                refs.update(images.project_images(docker))
                for key, ref in refs.items():
                    print(f"{key}\t{ref}")
            finally:
                docker.stop()
        elif args.command == "up":
            # stopped from outside (tools/run-tests.sh, whose background job ignores SIGINT): unwind, so that
            # `up` deletes the part of the cluster it made, as it does on any failure
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
            c = kind_cluster.up(args.name, args.workers, args.work, tuple(args.namespace),
                                trainjob_namespace=args.trainjob)
            print(f"KUBECONFIG={c.kubeconfig}")
            print(f"shared volume folder: {c.shared}")
            if c.docker.started is not None:
                print(f"dockerd started by this command keeps running (pid {c.docker.started.pid}); "
                      "`python tools/qwen_kind down` deletes the cluster and stops it")
        else:
            cache = kind_cluster.cache_dir()
            docker = ensure_docker(cache)
            bin_dir = kind_cluster.controlplane_bin_dir()
            kind_cluster.KindCluster(args.name, Path("/dev/null"), Path("/dev/null"), docker, bin_dir / "kind").delete()
            stop_daemon_we_started(cache)
    except KindSetupError as err:
        print(f"qwen_kind: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
