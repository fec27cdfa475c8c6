"""What a tuning log's records gain over qcompile's default schedules, kernel by kernel.

    python bench/tuned_vs_default.py [LOG_DIR] [--threads 2] [--out bench/results/tuned.json]
                                     [--drop-slower NEW_LOG_DIR]

For every packed int8 kernel of the log (tuning_logs/host by default) that has a measured
record, the kernel is built twice for this machine: with today's default schedule
(schedules/cpu/int8_default.py) and with the log's best record, and both are timed in this
process on the same random inputs (the runtime's time evaluator, median of 20 repeats of 50
runs). Beside them, the default schedule's time as the tune measured it (`qcompile-log.json`,
the default of the commit that tuned). Prints a Markdown table, largest gain first, checks that
both builds compute the same outputs, and writes JSON. Read the figures as ratios within one run.

--drop-slower writes a copy of the log without the kernels whose record ran more than
SLOWER_MARGIN slower than today's default schedule in this run (after the defaults improved,
a record tuned against the old ones can lose): compile then uses the default for them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SLOWER_MARGIN = 0.05  # two timings of one kernel here differ by a few percent


def best_records(log: Path) -> dict:
    """{workload key: (mean seconds, record)} of the log's fastest valid record per kernel."""
    from qcompile.tuning_log import mean_seconds, open_database, workload_key

    database = open_database(log)
    workloads = {}
    for record in database.get_all_tuning_records():
        workloads.setdefault(workload_key(record.workload.mod), record.workload)
    best = {}
    for key, workload in workloads.items():
        top = database.get_top_k(workload, 1)
        seconds = mean_seconds(top[0].run_secs) if top else None
        if seconds is not None:
            best[key] = (seconds, top[0])
    return best


def random_args(func, device):
    import tvm

    rng = np.random.default_rng(0)
    args = []
    for buffer in func.params:
        shape, dtype = [int(s) for s in buffer.shape], str(buffer.dtype)
        value = rng.integers(0, 16, shape) if "int" in dtype else rng.standard_normal(shape)
        args.append(tvm.runtime.tensor(value.astype(dtype), device))
    return args


def time_us(mod, target, args, device) -> tuple[float, np.ndarray]:
    import tvm

    func = mod["main"].with_attr("global_symbol", "main")
    executable = tvm.compile(tvm.IRModule({"main": func}), target=target)
    runtime = getattr(executable, "mod", executable)
    seconds = runtime.time_evaluator("main", device, number=50, repeat=20)(*args).median
    return seconds * 1e6, args[-1].numpy().copy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", nargs="?", default=str(ROOT / "tuning_logs" / "host"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "tuned.json"))
    parser.add_argument("--drop-slower", metavar="NEW_LOG_DIR",
                        help="write the log without the records that lose to the default")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import tvm
    from tvm import s_tir

    from qcompile.schedules.cpu import int8_default
    from qcompile.schedules.cpu.intrinsics import dot_product_for
    from qcompile.targets import load_target
    from qcompile.tuning_log import DEFAULTS_KEY, INFO_FILE
    from qcompile.tuning_log_check import RECORDS_FILE

    log = Path(args.log)
    if not (log / RECORDS_FILE).is_file() or not (log / INFO_FILE).is_file():
        print(f"tuned_vs_default: {log} is not a qcompile tuning log (it needs "
              "database_tuning_record.json and qcompile-log.json, as `qcompile tune --log DIR` "
              "writes them). Give a log directory, e.g. tuning_logs/host.", file=sys.stderr)
        return 2
    logged = json.loads((log / INFO_FILE).read_text()).get(DEFAULTS_KEY, {})
    target = load_target("host").to_tvm()
    dot, device = dot_product_for(target), tvm.cpu()
    rows = []
    for key, (seconds, record) in best_records(log).items():
        func = record.workload.mod["main"]
        default = int8_default.schedule(func, dot) if dot is not None else None
        if default is None:
            continue
        tuned = s_tir.Schedule(record.workload.mod)
        record.trace.apply_to_schedule(tuned, remove_postproc=False)
        inputs = random_args(func, device)
        default_us, default_out = time_us(default.mod, target, inputs, device)
        tuned_us, tuned_out = time_us(tuned.mod, target, inputs, device)
        rows.append({"kernel": key, "shapes": [[int(s) for s in b.shape] for b in func.params[:2]],
                     "logged_default_us": logged.get(key), "default_us": default_us,
                     "tuned_us": tuned_us, "same_outputs": bool(np.array_equal(default_out,
                                                                               tuned_out))})
        print(f"{len(rows)}: {rows[-1]['shapes']} default {default_us:.1f} us, tuned "
              f"{tuned_us:.1f} us", file=sys.stderr, flush=True)
    rows.sort(key=lambda r: -r["default_us"] / r["tuned_us"])
    print("| input, weight | default us (at the tune) | default us | tuned us | default / tuned "
          "| same outputs |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        at_tune = "" if r["logged_default_us"] is None else f"{r['logged_default_us']:.1f}"
        print(f"| {r['shapes'][0]}, {r['shapes'][1]} | {at_tune} | {r['default_us']:.1f} | "
              f"{r['tuned_us']:.1f} | {r['default_us'] / r['tuned_us']:.2f} | "
              f"{'yes' if r['same_outputs'] else 'NO'} |")
    total_default = sum(r["default_us"] for r in rows)
    total_tuned = sum(r["tuned_us"] for r in rows)
    print(f"\n{len(rows)} kernels: {total_default:.0f} us with the default schedules, "
          f"{total_tuned:.0f} us tuned")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"log": str(log), "threads": args.threads,
                                          "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    if args.drop_slower:
        from qcompile.tuning_log import prune

        slower = frozenset(r["kernel"] for r in rows
                           if r["tuned_us"] > r["default_us"] * (1 + SLOWER_MARGIN))
        kept = prune(log, args.drop_slower, keep=1_000_000, drop=slower)
        print(f"wrote {args.drop_slower}: {kept} records, without the {len(slower)} kernels "
              f"whose record lost to the default by more than {SLOWER_MARGIN:.0%}",
              file=sys.stderr)
    return 0 if all(r["same_outputs"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
