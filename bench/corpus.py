"""The real-model corpus (tests/corpus_models.py) timed against onnxruntime, side by side in one run.

    python bench/corpus.py [--models ppocr-det,silero-vad] [--threads 2] [--repeat 30]
                           [--rounds 3] [--out bench/results/corpus.json]

For each model: onnxruntime fp32 and int8 (quantize_static: QDQ, per-channel int8 weights,
uint8 activations, minmax; the same calibration samples as qcompile), qcompile fp32 and int8
(host, the shipped tuning log where it has records). Each configuration is built in this
process and timed in a fresh subprocess (TVM's and onnxruntime's thread pools never share a
process), then timed again in `rounds - 1` more rounds that take the configurations in turn
(this machine's speed drifts by minutes: one round can favour whichever configuration ran in a
quick minute). Reports the median over the rounds of each round's median latency over
`repeat` runs after warm-up, its ratio to
onnxruntime fp32 and int8, the file size, and each int8 build's task measure against fp32
(the corpus' own: text-map IoU, CTC agreement, VAD decisions, score cosines) on held-out data.
Prints a Markdown table and writes JSON. No asserts: the figures are read off the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the corpus lives with the tests
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

CONFIGS = ("onnxruntime-fp32", "onnxruntime-int8", "qcompile-fp32", "qcompile-int8")


def _runner(config: str, artifact: Path, threads: int):
    """A function running one sample -> the outputs in the model's order."""
    if config.startswith("onnxruntime"):
        from run import _ort_session

        session = _ort_session(artifact, threads)
        return lambda feed: session.run(None, feed)
    import qcompile

    os.environ["TVM_NUM_THREADS"] = str(threads)
    loaded = qcompile.load(artifact)
    names = [spec.name for spec in loaded.outputs]

    def run(feed):
        outputs = loaded.run(feed)  # once: a model with several outputs ran once per output
        return [outputs[name] for name in names]

    return run


def _calibration(model, source: Path) -> list[dict]:
    import onnxruntime as ort

    from corpus_models import calibration_samples

    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]) \
        if model.sequence is not None else None  # its fp32 states, for a stateful model
    return calibration_samples(model, lambda feed: session.run(None, feed))


def build(model, config: str, work: Path) -> tuple[Path, float]:
    """One configuration's model file or compiled directory, and its size in MB."""
    from run import _ort_quantize

    source = model.prepared(work)
    if config == "onnxruntime-fp32":
        return source, source.stat().st_size / 1e6
    if config == "onnxruntime-int8":
        out = _ort_quantize(source, work / f"{model.name}-ort-int8.onnx",
                            _calibration(model, source))
        return out, out.stat().st_size / 1e6
    import qcompile

    options = {"quantize": "int8", "calibration": _calibration(model, source)} \
        if config == "qcompile-int8" else {}
    artifact = qcompile.compile(source, "host", work / config, input_shapes=model.shapes,
                                **options)
    return artifact.directory, artifact.manifest.library_bytes / 1e6


def time_one(name: str, config: str, artifact: Path, threads: int, repeat: int,
             out: Path, outputs: bool = True) -> None:
    """(In a subprocess.) The median latency (out.json) and, with `outputs`, the held-out
    outputs (out.npz: array "i_j" is output j of sample i) of one build."""
    from corpus_models import BY_NAME, HELD_OUT_SEEDS, held_out_outputs

    model = BY_NAME[name]
    run = _runner(config, artifact, threads)
    feed = model.samples(HELD_OUT_SEEDS[0]) if model.sequence is None else \
        {input_name: np.zeros(shape, np.float32) for input_name, shape in model.shapes.items()}
    for _ in range(3):
        run(feed)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run(feed)
        times.append((time.perf_counter() - start) * 1e3)
    out.with_suffix(".json").write_text(json.dumps({"median_ms": statistics.median(times)}))
    if outputs:
        held_out = [[o] if model.sequence else o for o in held_out_outputs(model, run)]
        np.savez(out.with_suffix(".npz"), **{f"{i}_{j}": np.asarray(v) for i, sample in
                                             enumerate(held_out) for j, v in enumerate(sample)})


def _time_in_subprocess(name: str, config: str, artifact: Path, out: Path, args,
                        outputs: bool) -> None:
    done = subprocess.run(
        [sys.executable, __file__, "--one", name, config, str(artifact), str(out),
         "--threads", str(args.threads), "--repeat", str(args.repeat)]
        + ([] if outputs else ["--no-outputs"]), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip() or f"exit code {done.returncode}")


def _read(out: Path, sequence: bool) -> dict:
    median = json.loads(out.with_suffix(".json").read_text())["median_ms"]
    with np.load(out.with_suffix(".npz")) as saved:
        samples: dict[int, dict[int, np.ndarray]] = {}
        for key in saved.files:
            i, j = map(int, key.split("_"))
            samples.setdefault(i, {})[j] = saved[key]
    outputs = [[sample[j] for j in sorted(sample)] for _, sample in sorted(samples.items())]
    return {"median_ms": median, "outputs": [o[0] for o in outputs] if sequence else outputs}


def main() -> int:
    from corpus_models import BY_NAME, CORPUS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(m.name for m in CORPUS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3,
                        help="timing rounds, each configuration in turn (default 3)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "corpus.json"))
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # NAME CONFIG BUILD OUT
    parser.add_argument("--no-outputs", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, config, artifact, out = args.one
        time_one(name, config, Path(artifact), args.threads, args.repeat, Path(out),
                 outputs=not args.no_outputs)
        return 0
    if args.rounds < 1:
        print("bench/corpus.py: --rounds must be at least 1", file=sys.stderr)
        return 2
    unknown = set(args.models.split(",")) - set(BY_NAME)
    if unknown:
        print(f"bench/corpus.py: no corpus model {', '.join(sorted(unknown))}; the corpus: "
              f"{', '.join(BY_NAME)}", file=sys.stderr)
        return 2
    rows = []
    for name in args.models.split(","):
        model = BY_NAME[name]
        work = Path(tempfile.mkdtemp(prefix=f"corpus-{name}-"))
        results, artifacts = {}, {}
        for config in CONFIGS:
            print(f"corpus: {name} / {config} ...", file=sys.stderr, flush=True)
            row = {"model": name, "config": config}
            try:
                artifact, size = build(model, config, work)
                out = work / f"{config}-timed"
                _time_in_subprocess(name, config, artifact, out, args, outputs=True)
                result = _read(out, model.sequence is not None)
                results[config], artifacts[config] = result, artifact
                row.update(size_mb=size, rounds_ms=[result["median_ms"]])
            except Exception as exc:  # a configuration that fails is a row saying so
                row["failed"] = _last_line(exc)
            rows.append(row)
        by_config = {row["config"]: row for row in rows[-len(CONFIGS):]}
        for round_ in range(2, args.rounds + 1):
            for config, artifact in artifacts.items():
                row = by_config[config]
                if "failed" in row:
                    continue
                print(f"corpus: {name} / {config}: timing round {round_}/{args.rounds}",
                      file=sys.stderr, flush=True)
                out = work / f"{config}-round{round_}"
                try:
                    _time_in_subprocess(name, config, artifact, out, args, outputs=False)
                    row["rounds_ms"].append(json.loads(out.with_suffix(".json").read_text())
                                            ["median_ms"])
                except Exception as exc:
                    row["failed"] = _last_line(exc)
        for config, row in by_config.items():
            if "failed" not in row:
                row["median_ms"] = statistics.median(row["rounds_ms"])
        base = {c: by_config[c].get("median_ms") for c in CONFIGS}
        reference = results.get("onnxruntime-fp32", {}).get("outputs")
        for row in rows[-len(CONFIGS):]:
            if "median_ms" not in row:
                continue
            for peer in ("onnxruntime-fp32", "onnxruntime-int8"):
                if base[peer]:
                    row[f"x_{peer}"] = row["median_ms"] / base[peer]
            if reference is not None:
                row["task"] = model.score(reference, results[row["config"]]["outputs"])
        print(f"corpus: {name} done", file=sys.stderr, flush=True)
    _print(rows, args, BY_NAME)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "rounds": args.rounds,
                                          "rows": rows}, indent=1))
    print(f"\nwrote {args.out}")
    return 0


def _last_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__


def _print(rows, args, by_name) -> None:
    print(f"\n{args.threads} threads, median over {args.rounds} round(s) of the median of "
          f"{args.repeat} runs; task measure of each build against onnxruntime fp32 on "
          "held-out data\n")
    print("| model | config | median ms | x ort fp32 | x ort int8 | size MB | task measure |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "failed" in row:
            print(f"| {row['model']} | {row['config']} | failed: {row['failed']} | | | | |")
            continue
        ratio = lambda key: f"{row[key]:.2f}" if key in row else ""  # noqa: E731
        task = f"{row['task']:.3f} ({by_name[row['model']].measure})" if "task" in row else ""
        print(f"| {row['model']} | {row['config']} | {row['median_ms']:.2f} | "
              f"{ratio('x_onnxruntime-fp32')} | {ratio('x_onnxruntime-int8')} | "
              f"{row['size_mb']:.1f} | {task} |")


if __name__ == "__main__":
    sys.exit(main())
