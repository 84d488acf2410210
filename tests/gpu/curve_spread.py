"""How far apart two 50-step MoE loss curves are when nothing but rounding separates them.

The lever test (test_moe_levers.py) holds each lever to 1e-3 relative against the path it replaces, or to the
spread of repeated default runs where that is larger. A fixed rule only separates a lever from its baseline if the
baseline repeats itself much more closely; atomic adds in the backward (the word embedding's gradient rows go
into the buffer by index_add) make two runs of one configuration differ too. This
script trains the lever test's model with each configuration given (EngineOptions as JSON, `{}` for the
defaults) `--repeat` times, and prints, for every run, the largest relative distance of its losses and held-out
losses from the first run of the first configuration, and from `--reference` (default: the Triton kernel that
sums the experts' weight gradients in fp32, the closest to exact arithmetic the engine has).

    python3 tests/gpu/curve_spread.py '{}' '{"defer_expert_wgrad": true}' --repeat 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_moe_levers import _distance, _run  # noqa: E402  (the lever test's own worker and measure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="EngineOptions as JSON, one per configuration")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--reference", default='{"expert_wgrad_into_buffer": true}')
    args = parser.parse_args()
    reference = _run(json.loads(args.reference))
    runs = []
    for config in args.configs:
        for i in range(args.repeat):
            runs.append((config, i, _run(json.loads(config))))
    first = runs[0][2]
    print(f"{'configuration':48s} run  vs first run  vs reference  last loss")
    for config, i, row in runs:
        print(f"{config:48s} {i:3d}  {_distance(row, first):12.3e}  {_distance(row, reference):12.3e}  "
              f"{row['losses'][-1]:.6f}")
    print(f"{'reference ' + args.reference:48s}      {_distance(reference, first):12.3e}  {0.0:12.3e}  "
          f"{reference['losses'][-1]:.6f}")
    print("RUNS " + json.dumps([dict(config=c, run=i, losses=r["losses"], evals=r["evals"]) for c, i, r in runs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
