"""`qcompile generate OUT_DIR --prompt ...`, and `qcompile compile --max-context N` for a
decoder: the command-line side of compile.py, generate.py and text.py."""

from __future__ import annotations

import sys

from ..errors import InputError

GENERATE_HELP = """\
Generate text with a language model compiled with `qcompile compile MODEL --max-context N`:
the prompt is tokenized with OUT_DIR/tokenizer.json, run through the model at once (prefill),
then one token at a time (decode) with the KV cache kept on the device; the text is printed as
it comes, then the prompt's and the answer's tokens per second. Runs on this machine, or on
a device through an RPC tracker (the library built for its target; one round trip per token).
"""


def add_generate(sub, device_args) -> None:
    p = sub.add_parser("generate", help="generate text with a compiled language model",
                       description=GENERATE_HELP)
    p.add_argument("out_dir", metavar="OUT_DIR", help="what `qcompile compile --max-context` "
                                                       "wrote")
    p.add_argument("--prompt", required=True, help="the text to continue, or with --chat the "
                                                   "user's message")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template (ChatML), with its "
                        "default system message")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                   help="stop after N new tokens (default: 128), or at the end-of-sequence "
                        "token")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 (default): the most likely token each time; above 0: sampled "
                        "from softmax(logits / T)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    device_args(p, "TVM RPC tracker through which to reach the device")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from ..runtime import load
    from .compile import DecoderInfo
    from .generate import Decoder
    from .text import Text

    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {args.max_new_tokens}: give 1 or more.")
    if args.temperature < 0:
        raise InputError(f"--temperature {args.temperature}: give 0 (greedy) or more.")
    info = DecoderInfo.open(args.out_dir)
    text = Text(args.out_dir, info.vocabulary)
    prompt = text.encode(args.prompt, chat=args.chat)
    with load(args.out_dir, rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key) as loaded:
        stream_answer(Decoder(loaded, info), text, prompt, args.max_new_tokens,
                      temperature=args.temperature, seed=args.seed, where=loaded.where)
    return 0


def stream_answer(decoder, text, prompt: list[int], max_new_tokens: int, *,
                  temperature: float = 0.0, seed: int = 0, where: str = ""):
    """Generate after `prompt` (token ids) with a generate.Decoder, the text written to stdout
    as it comes, then the prompt's and the answer's tokens/s to stderr; the Generation."""
    from .text import TextStream

    stream = TextStream(text)

    def show(token: int) -> None:
        sys.stdout.write(stream.add(token))
        sys.stdout.flush()

    result = decoder.generate(prompt, max_new_tokens, stop=text.stop_tokens,
                              temperature=temperature, seed=seed, on_token=show)
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(f"prompt: {result.prompt_tokens} tokens at {result.prefill_tokens_per_s:.1f} "
          f"tokens/s; answer: {len(result.tokens)} tokens at "
          f"{result.decode_tokens_per_s:.1f} tokens/s" + (f" ({where})" if where else ""),
          file=sys.stderr)
    return result


def compile_decoder_command(args, config) -> int:
    """`qcompile compile MODEL --max-context N`: the options a decoder takes, checked."""
    from ..modes import NEEDS_CALIBRATION, mode_from
    from .compile import NO_CALIBRATION, compile_decoder

    for given, option in ((args.input_shape, "--input-shape"),
                          (args.tuning_log, "--tuning-log"),
                          (args.rpc_tracker, "--rpc-tracker")):
        if given:
            raise InputError(f"{option} does not apply with --max-context: a decoder is "
                             "compiled for any prompt length up to the maximum context, here. "
                             "Leave out " + option + ".")
    if args.quantize in NEEDS_CALIBRATION:  # before the mode asks for --calibration
        raise InputError(NO_CALIBRATION.format(quantize=args.quantize))
    mode = mode_from(args.quantize, None, config) if args.quantize else None
    artifact, info = compile_decoder(args.model, args.target, args.out_dir,
                                     max_context=args.max_context,
                                     prefill_chunk=args.prefill_chunk, quantize=mode,
                                     calibration=args.calibration, cc=args.cc)
    print(f"wrote {artifact.library} ({artifact.manifest.library_bytes / 1e6:.1f} MB), "
          f"{artifact.directory / 'model.json'} and the decoder's settings; run it with "
          f"`qcompile generate {artifact.directory} --prompt ...`")
    return 0
