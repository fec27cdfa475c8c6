"""Text in and out of a compiled decoder: the tokenizer saved beside the library
(tokenizer.json, read by the `tokenizers` package) and the generation settings
(generation.json: the end-of-sequence and beginning tokens, the chat template's form).

Both are copied from the model's folder when it is compiled, so OUT_DIR is all a device needs.
Only the ChatML chat form is rendered (`<|im_start|>role\\ncontent<|im_end|>\\n`, with the
model's default system message if it has one: SmolLM2's, Qwen's), since jinja2 is not a
dependency; another form is refused with `--chat`, and the prompt can be written out instead.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, ModelError

log = logging.getLogger(__name__)

TOKENIZER, GENERATION = "tokenizer.json", "generation.json"


@dataclass(frozen=True)
class ChatTemplate:
    """The ChatML template: the prompt for one user message, ready for the reply."""

    system: str | None  # the default system message the template adds, if any

    def prompt(self, message: str) -> str:
        system = "" if self.system is None else \
            f"<|im_start|>system\n{self.system}<|im_end|>\n"
        return f"{system}<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"


def copy_text_files(model: str | Path, out_dir: Path) -> list[str]:
    """Copy tokenizer.json and generation.json from beside `model` into `out_dir`; the names
    of those found."""
    found = []
    for name in (TOKENIZER, GENERATION):
        source = Path(model).parent / name
        if source.is_file():
            shutil.copyfile(source, out_dir / name)
            found.append(name)
    return found


class Text:
    """Encoding prompts and decoding tokens for the compiled decoder in `directory`."""

    def __init__(self, directory: str | Path, vocabulary: int | None = None):
        """`vocabulary`: the model's logits' size; a tokenizer with more tokens than that is
        another model's, and refused."""
        directory = Path(directory)
        path = directory / TOKENIZER
        if not path.is_file():
            raise ModelError(f"'{directory}' has no {TOKENIZER}, so text cannot be turned into "
                             f"tokens. Put the model's {TOKENIZER} beside the .onnx file and "
                             "compile again (it is copied into OUT_DIR).")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            from ..errors import MissingPackageError

            raise MissingPackageError("Generating text needs the tokenizers package: "
                                      "pip install tokenizers.") from None
        self.tokenizer = Tokenizer.from_file(str(path))
        size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if vocabulary is not None and size > vocabulary:
            raise ModelError(f"{path} has {size} tokens but the model's output has "
                             f"{vocabulary}: it is another model's tokenizer. Put the "
                             f"model's own {TOKENIZER} beside the .onnx file and compile "
                             "again.")
        settings_path = directory / GENERATION
        self.settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}

    @property
    def stop_tokens(self) -> tuple[int, ...]:
        eos = self.settings.get("eos_token_id")
        ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
        return tuple(int(i) for i in ids)

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if chat:
            prompt = self.chat_template().prompt(prompt)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        bos = self.settings.get("bos_token_id")
        if self.settings.get("add_bos_token") and bos is not None and not chat:
            ids = [int(bos), *ids]
        return ids

    def chat_template(self) -> ChatTemplate:
        if self.settings.get("chat_template") != "chatml":
            raise InputError("--chat needs the model's chat form, and this model's "
                             f"{GENERATION} does not name ChatML (the one qcompile renders). "
                             "Write the whole prompt, with the model's chat markers, without "
                             "--chat.")
        return ChatTemplate(self.settings.get("default_system_message"))

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class TextStream:
    """The text of tokens as they come: each call gives what the new token adds (a character
    split over several tokens appears once whole)."""

    def __init__(self, text: Text):
        self.text = text
        self.ids: list[int] = []
        self.shown = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        full = self.text.decode(self.ids)
        if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return ""
        new, self.shown = full[len(self.shown):], full
        return new
