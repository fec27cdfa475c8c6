"""The tokenizer and chat template a GGUF file carries, without the original tokenizer.json.

tokenizer.ggml.model "gpt2" is byte-level BPE: the vocabulary (tokenizer.ggml.tokens, ids by
position), the merges ("a b", by rank), and the control tokens (token_type 3, and 4: user
defined) matched whole before BPE. tokenizer.ggml.pre names llama.cpp's pre-tokenizer, its
split of the text before BPE: PRE_TOKENIZERS lists those rebuilt here.

The chat template is Jinja; jinja2 is not a dependency, so the templates of the ChatML form
(SmolLM2's, Qwen's: `<|im_start|>role\\ncontent<|im_end|>\\n`, optionally with a default system
message) are recognised and rendered for one user message, and others refused.
"""

from __future__ import annotations

import re

from ...decoder.text import ChatTemplate
from ...errors import ModelError

# token_type values of llama.cpp's vocabulary (llama_token_type)
CONTROL, USER_DEFINED = 3, 4
# llama.cpp's pre-tokenizer names -> whether digits are split one by one before the GPT-2
# byte-level split: their regexes are "\p{N}" then GPT-2's (llama-vocab.cpp)
PRE_TOKENIZERS = {"smollm": True, "starcoder": True, "refact": True, "codeshell": True,
                  "gpt-2": False, "gpt2": False, "default": False}


def build_tokenizer(model):
    """A tokenizers.Tokenizer equal to the one the GGUF metadata describes."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    kind = model.get("tokenizer.ggml.model")
    pre = model.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise ModelError(
            f"{model.path.name} has a tokenizer of type '{kind}' with pre-tokenizer '{pre}'. "
            "The converter rebuilds byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2') "
            f"with the pre-tokenizers {', '.join(sorted(PRE_TOKENIZERS))}; use the model's "
            "own tokenizer.json instead.")
    tokens = list(model.get("tokenizer.ggml.tokens"))
    types = list(model.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(merge.split(" ", 1)) for merge in model.get("tokenizer.ggml.merges")]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ModelError(f"{model.path.name}'s vocabulary repeats tokens "
                         f"({len(tokens) - len(vocab)} duplicates); it cannot be a BPE "
                         "vocabulary of unique tokens.")
    unk = model.get("tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(BPE(vocab, merges, unk_token=None if unk is None else tokens[unk],
                              fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level]) if PRE_TOKENIZERS[pre] \
        else byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([
        AddedToken(token, special=True, normalized=False)
        for token, kind in zip(tokens, types) if kind in (CONTROL, USER_DEFINED)])
    return tokenizer


_NL = r"(?:\n|\\n)"  # a newline in a Jinja string literal, written out or escaped


def _words(*parts: str) -> str:
    """Jinja tags and expressions separated by optional whitespace."""
    return r"\s*".join(parts)


def _tag(body: str) -> str:
    return r"\{%-?\s*" + body + r"\s*-?%\}"


def _out(body: str) -> str:
    return r"\{\{-?\s*" + body + r"\s*-?\}\}"


_IM_END = r"'<\|im_end\|>(?:'\s*\+\s*')?" + _NL + "'"
_CHATML = re.compile("^" + _words(
    _tag(r"for message in messages"),
    "(?:" + _words(
        _tag(r"if loop\.first and messages\[0\]\['role'\] != 'system'"),
        _out(r"'<\|im_start\|>system" + _NL + r"(?P<system>[^'\\]*)<\|im_end\|>" + _NL + "'"),
        _tag("endif")) + ")?",
    _out(r"'<\|im_start\|>'\s*\+\s*message\['role'\]\s*\+\s*'" + _NL + r"'\s*\+\s*"
         r"message\['content'\]\s*\+\s*" + _IM_END),
    _tag("endfor"),
    _tag("if add_generation_prompt"),
    _out(r"'<\|im_start\|>assistant" + _NL + "'"),
    _tag("endif")) + r"\s*$")


def chat_template(model) -> ChatTemplate:
    """The model's chat template (tokenizer.chat_template), if of the ChatML form."""
    template = model.get("tokenizer.chat_template")
    found = None if template is None else _CHATML.match(template)
    if found is None:
        what = "no chat template" if template is None else \
            f"a chat template that is not ChatML ({template[:80]!r}...)"
        raise ModelError(
            f"{model.path.name} has {what}. Without jinja2 the converter renders only "
            "ChatML templates (<|im_start|>role\\ncontent<|im_end|>\\n, optionally with a "
            "default system message, as SmolLM2's and Qwen's); write the prompt yourself and "
            "tokenize it with the saved tokenizer.json.")
    return ChatTemplate(found.group("system"))
