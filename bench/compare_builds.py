"""Compare builds of one model, in one process, on one input.

    python bench/compare_builds.py OUT_DIR OUT_DIR... --inputs x.npz [--rounds 9]
                                   [--repeat 10] [--out bench/results/compare.json]

Each round times every build in turn with the runtime's time evaluator (`LoadedModel.
benchmark`); the figure per build is the median of its round medians, so that a busy minute on
this shared machine falls on every build alike. Outputs are compared too: bit-identical, or the
largest difference. For two changes to one kernel, this resolves a few percent, which separate
runs of `run.py` do not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("builds", nargs="+", type=Path, help="qcompile compile's OUT_DIRs")
    parser.add_argument("--inputs", required=True, type=Path, help="one sample (.npz)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeat < 1:
        print("compare_builds: --rounds and --repeat must be at least 1.", file=sys.stderr)
        return 2
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    import qcompile
    from qcompile.errors import QcompileError

    try:
        inputs = dict(np.load(args.inputs))
        models = [qcompile.load(b) for b in args.builds]
        outputs = [m.run(inputs) for m in models]
        times: list[list[float]] = [[] for _ in models]
        for _ in range(args.rounds):
            for model, row in zip(models, times):
                row.append(model.benchmark(inputs, repeat=args.repeat).median_ms)
    except (QcompileError, OSError, ValueError) as exc:
        print(f"compare_builds: {exc}", file=sys.stderr)
        return 2
    first = outputs[0]
    rows = []
    print(f"threads {os.environ['TVM_NUM_THREADS']}, {args.rounds} rounds x {args.repeat} "
          "repeats, median of round medians")
    print(f"{'ms':>8} {'min ms':>8} {'ratio':>6}  outputs vs the first   build")
    for build, row, out in zip(args.builds, times, outputs):
        diff = max(float(np.max(np.abs(np.asarray(out[k], np.float64)
                                       - np.asarray(first[k], np.float64)))) for k in first)
        median = statistics.median(row)
        base = statistics.median(times[0])
        same = "identical" if diff == 0 else f"max |diff| {diff:.3g}"
        print(f"{median:8.3f} {min(row):8.3f} {median / base:6.3f}  {same:22s} {build}")
        rows.append({"build": str(build), "median_ms": median, "rounds_ms": row,
                     "max_abs_diff_vs_first": diff})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"threads": os.environ["TVM_NUM_THREADS"],
                                        "rounds": args.rounds, "repeat": args.repeat,
                                        "builds": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
