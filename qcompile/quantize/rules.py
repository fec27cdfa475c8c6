"""Precision rules: which layers run in int8, int4, lut4 (palettes), fp16 or fp32, and how
each integer layer is quantized.

A rules file is TOML, read top to bottom:

    [defaults]                  # optional: for every layer no rule sets
    calibration = "percentile"

    [[rule]]                    # the first conv on the image stays fp32
    first = 1
    precision = "fp32"

    [[rule]]
    op = ["Gemm", "MatMul"]     # ONNX op types
    precision = "fp16"

    [[rule]]
    name = "blocks.1*/project_conv"   # glob on the ONNX node name; "re:<regex>" for a regex
    calibration = "entropy"
    weights = "per-tensor"
    activations = "int8"
    symmetric = true

A rule matches a layer when every selector it gives matches (name, op, first = N: the first N
layers, last = N: the last N). For each setting of a layer, the first matching rule that gives
that setting wins; then [defaults]; then the command line's options. A rule whose selectors match
no layer is a warning that names it. Layers are the model's weighted ops (Conv, Gemm, MatMul...),
named as `qcompile inspect MODEL` lists them.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import InputError
from .observers import ACTIVATION_DTYPES, METHODS
from .weights import GROUP_SIZES
from .schemes import CALIBRATED, FOUR_BITS, RULE_PRECISIONS

log = logging.getLogger(__name__)

PRECISIONS = RULE_PRECISIONS  # int8, fp16, fp32, int4, lut4: every scheme a rule may name
# what --quantize auto keeps a sensitive layer in: int8-a16 is int8 with 16-bit inputs
FALLBACKS = ("fp32", "fp16", "int8-a16")
SELECTORS = ("name", "op", "first", "last")
SETTINGS = ("precision", "calibration", "weights", "activations", "symmetric", "group_size")
# the input type of an int8 layer; 16 bits: the input is split into two bytes, each multiplied
# by the int8 weights (twice the int8 MACs), for inputs that one int8 scale cannot hold
ACTIVATIONS = ACTIVATION_DTYPES


@dataclass(frozen=True)
class LayerSettings:
    """How one layer is computed: its precision and, for int8, its quantization options."""

    precision: str = "int8"           # int8 | fp16 | fp32
    method: str = "minmax"            # calibration method of the layer's input
    per_channel: bool = True          # weight scales per output channel
    activations: str = "uint8"        # the layer's input integer type: (u)int8 | (u)int16
    symmetric: bool = False
    group_size: int = 32              # int4, lut4: reduction elements per weight scale


@dataclass(frozen=True)
class Rule:
    """One [[rule]]: selectors (all must match) and the settings it gives."""

    index: int                                   # position in the file, from 1
    names: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()
    first: int | None = None
    last: int | None = None
    settings: Mapping[str, object] = field(default_factory=dict)
    origin: str = ""    # a rule made from an option (--float-layer), not read from a file

    @classmethod
    def for_layers(cls, names, settings: Mapping[str, object], origin: str) -> "Rule":
        """A rule that matches exactly the layers `names` (no glob), made from an option."""
        return cls(0, tuple(_glob_escape(n) for n in names), settings=dict(settings),
                   origin=origin)

    def describe(self) -> str:
        parts = [f"name={list(self.names)}" if self.names else "",
                 f"op={list(self.ops)}" if self.ops else "",
                 f"first={self.first}" if self.first is not None else "",
                 f"last={self.last}" if self.last is not None else ""]
        return f"rule {self.index} ({', '.join(p for p in parts if p)})"

    def matches(self, name: str, op: str, position: int, count: int) -> bool:
        if self.names and not any(_name_matches(p, name) for p in self.names):
            return False
        if self.ops and op not in self.ops:
            return False
        if self.first is not None and position >= self.first:
            return False
        if self.last is not None and position < count - self.last:
            return False
        return True


def _name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


@dataclass(frozen=True)
class PrecisionRules:
    rules: tuple[Rule, ...] = ()
    defaults: Mapping[str, object] = field(default_factory=dict)
    source: str = "rules"

    @classmethod
    def load(cls, path: str | Path) -> "PrecisionRules":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python < 3.11
            import tomli as tomllib

        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"Precision rules file {path} does not exist.") from None
        except UnicodeDecodeError as exc:
            raise InputError(f"Precision rules file {path} is not a text file (byte "
                             f"{exc.start} is not UTF-8). Write the rules as TOML in UTF-8 "
                             "(docs/guide/precision.md).") from None
        except OSError as exc:
            raise InputError(f"Precision rules file {path} cannot be read ({exc.strerror or exc})"
                             ". Pass the path of a .toml file.") from None
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"Precision rules file {path} is not valid TOML: {exc}.") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "rules") -> "PrecisionRules":
        unknown = set(data) - {"rule", "defaults"}
        if unknown:
            raise InputError(f"{source}: unknown table(s) {', '.join(sorted(unknown))}; a rules "
                             "file has [defaults] and [[rule]] entries.")
        defaults = data.get("defaults", {})
        if not isinstance(defaults, Mapping):
            raise InputError(f"{source}: 'defaults' must be a table of settings, e.g. "
                             f"[defaults] precision = \"fp32\"; not {defaults!r}.")
        defaults = _settings(dict(defaults), f"{source} [defaults]")
        rules = []
        entries = data.get("rule", [])
        if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
            raise InputError(f"{source}: write rules as [[rule]] tables (an array of tables "
                             "with selectors and settings), not 'rule = ...'.")
        for i, entry in enumerate(entries, start=1):
            where = f"{source} rule {i}"
            entry = dict(entry)
            unknown = set(entry) - set(SELECTORS) - set(SETTINGS)
            if unknown:
                raise InputError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                                 f"selectors are {', '.join(SELECTORS)}, settings "
                                 f"{', '.join(SETTINGS)}.")
            if not any(k in entry for k in SELECTORS):
                raise InputError(f"{where}: no selector; give name, op, first or last (use "
                                 "[defaults] for settings that apply to every layer).")
            settings = _settings({k: entry[k] for k in SETTINGS if k in entry}, where)
            if not settings:
                raise InputError(f"{where}: sets nothing; give one of {', '.join(SETTINGS)}.")
            rules.append(Rule(i, _strings(entry.get("name"), where, "name"),
                              _strings(entry.get("op"), where, "op"),
                              _count(entry.get("first"), where, "first"),
                              _count(entry.get("last"), where, "last"), settings))
        return cls(tuple(rules), defaults, source)

    def resolve(self, layers: Sequence[tuple[str, str]], base: LayerSettings,
                ) -> tuple[dict[str, LayerSettings], list[str], set[str]]:
        """({layer name: settings} for every layer, warnings, the layers whose precision a
        rule or [defaults] sets). layers: (name, op) in order."""
        count = len(layers)
        used = [False] * len(self.rules)
        plan, explicit = {}, set()
        for position, (name, op) in enumerate(layers):
            chosen: dict[str, object] = {}
            for k, rule in enumerate(self.rules):
                if rule.matches(name, op, position, count):
                    used[k] = True
                    for key, value in rule.settings.items():
                        chosen.setdefault(key, value)
            for key, value in self.defaults.items():
                chosen.setdefault(key, value)
            if "precision" in chosen:
                explicit.add(name)
            plan[name] = replace(base, **chosen)
        warnings = [f"{self.source}: {rule.describe()} matches no layer of the model"
                    for rule, hit in zip(self.rules, used) if not hit and not rule.origin]
        return plan, warnings, explicit


def _strings(value, where: str, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        raise InputError(f"{where}: '{key}' must be a string or a list of strings.")
    for pattern in value:
        if key == "name" and pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise InputError(f"{where}: name {pattern!r} is not a valid regular expression "
                                 f"({exc}). Fix it, or write a glob without 're:' (e.g. "
                                 "\"blocks.1*\").") from None
    return tuple(value)


def _count(value, where: str, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{where}: '{key}' must be a positive integer, not {value!r}.")
    return value


def _settings(entry: dict, where: str) -> dict[str, object]:
    """TOML keys -> LayerSettings fields, checked."""
    out: dict[str, object] = {}
    unknown = set(entry) - set(SETTINGS)
    if unknown:
        raise InputError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}; use "
                         f"{', '.join(SETTINGS)}.")
    if "precision" in entry:
        if entry["precision"] not in PRECISIONS:
            raise InputError(f"{where}: precision must be one of {', '.join(PRECISIONS)}, not "
                             f"{entry['precision']!r}.")
        out["precision"] = entry["precision"]
    if "calibration" in entry:
        if entry["calibration"] not in METHODS:
            raise InputError(f"{where}: calibration must be one of {', '.join(METHODS)}, not "
                             f"{entry['calibration']!r}.")
        out["method"] = entry["calibration"]
    if "weights" in entry:
        if entry["weights"] not in ("per-channel", "per-tensor"):
            raise InputError(f"{where}: weights must be per-channel or per-tensor, not "
                             f"{entry['weights']!r}.")
        out["per_channel"] = entry["weights"] == "per-channel"
    if "activations" in entry:
        if entry["activations"] not in ACTIVATIONS:
            raise InputError(f"{where}: activations must be one of {', '.join(ACTIVATIONS)}, "
                             f"not {entry['activations']!r}.")
        out["activations"] = entry["activations"]
    if "symmetric" in entry:
        if not isinstance(entry["symmetric"], bool):
            raise InputError(f"{where}: symmetric must be true or false.")
        out["symmetric"] = entry["symmetric"]
    if "group_size" in entry:
        if entry["group_size"] not in GROUP_SIZES or isinstance(entry["group_size"], bool):
            raise InputError(f"{where}: group_size must be one of "
                             f"{', '.join(map(str, GROUP_SIZES))}, not {entry['group_size']!r}.")
        out["group_size"] = entry["group_size"]
    return out


def rules_toml(plan: Mapping[str, LayerSettings], base: LayerSettings, header: str = "") -> str:
    """A rules file that reproduces `plan`: one rule per group of layers whose settings differ
    from `base` in the same way."""
    groups: dict[tuple, list[str]] = {}
    for name, settings in plan.items():
        diff = []
        if settings.precision != base.precision:
            diff.append(("precision", settings.precision))
        if settings.precision in CALIBRATED:
            if settings.method != base.method:
                diff.append(("calibration", settings.method))
            if settings.per_channel != base.per_channel:
                diff.append(("weights", "per-channel" if settings.per_channel else "per-tensor"))
            if settings.activations != base.activations:
                diff.append(("activations", settings.activations))
            if settings.symmetric != base.symmetric:
                diff.append(("symmetric", settings.symmetric))
        if settings.precision in FOUR_BITS and settings.group_size != base.group_size:
            diff.append(("group_size", settings.group_size))
        if diff:
            groups.setdefault(tuple(diff), []).append(name)
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    lines.append("# qcompile precision rules (see `qcompile compile --help`)")
    lines.append("[defaults]")
    lines.append(f'precision = "{base.precision}"')
    for diff, names in groups.items():
        lines.append("")
        lines.append("[[rule]]")
        lines.append("name = [" + ", ".join(_toml_string(_glob_escape(n)) for n in names) + "]")
        for key, value in diff:
            lines.append(f"{key} = " + ("true" if value is True else "false" if value is False
                                        else str(value) if isinstance(value, int)
                                        else _toml_string(value)))
    return "\n".join(lines) + "\n"


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
