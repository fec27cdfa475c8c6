"""Errors that reach the user.

Every error raised on bad input is a QcompileError whose message is one paragraph naming the
problem and what to do about it. The CLI prints that paragraph and exits with its `exit_code`
(2: the input; 1: a failure inside TVM that qcompile caught), without a traceback; anything else
escaping is a bug in qcompile.
"""


def last_line(message: str, default: str = "?") -> str:
    """The last non-empty line of a (multi-line) error message, such as TVM's: what went
    wrong; `default` when there is none."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[-1] if lines else default


class QcompileError(Exception):
    """Base class for errors caused by the user's input or environment."""

    exit_code = 2


class ModelError(QcompileError):
    """The model file is missing, unreadable or not ONNX."""


class UnsupportedOpError(QcompileError):
    """An operator of the model has no importer (or no kernel) in TVM."""


class ShapeError(QcompileError):
    """An input shape is dynamic and not given, or a given shape is malformed."""


class TargetError(QcompileError):
    """A target name or target file is unknown or malformed."""


class ToolchainError(QcompileError):
    """A cross compiler needed for the target is not installed."""


class MissingPackageError(QcompileError):
    """A Python package that this command needs (an extra of qcompile) is not installed."""


class InputError(QcompileError):
    """Run-time inputs do not match the compiled model's manifest."""


class CodegenError(QcompileError):
    """The code TVM generated for the target has a known defect (it would compute wrong
    results); another schedule or precision avoids it."""


class DeviceError(QcompileError):
    """An RPC tracker or device could not be reached or failed during a session."""


class TuneInterrupted(QcompileError):
    """A tune stopped by Ctrl-C or SIGTERM after its current batch; the log keeps every record."""


class TuneFailed(QcompileError):
    """A tune failed inside TVM for a reason that is not the input's; the log keeps what was
    measured and the traceback."""

    exit_code = 1
