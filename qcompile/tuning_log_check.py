"""A tuning log's files read line by line before MetaSchedule opens them, so that a damaged
log is refused at once, naming the file, the line and the fix, instead of failing deep inside
TVM after the model was imported and optimized (or inside XGBoost during a tune).

database_workload.json holds one workload (a kernel) per line; database_tuning_record.json one
record per line: [workload line index, [trace, run times, target, argument info]]. Trailing
lines that are not JSON are what a tune killed while writing leaves: they are dropped (torn),
and so are trailing empty lines. Any other damage is refused: a line in the middle that is
empty or not JSON, a workload or schedule TVM cannot read, a record of a workload the log does
not hold, a run time that is not a positive number.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, last_line

WORKLOADS_FILE = "database_workload.json"
RECORDS_FILE = "database_tuning_record.json"


@dataclass(frozen=True)
class CheckedLog:
    """The log's files as they may be loaded: {file name: text}, with the torn trailing
    lines ({file name: count}) dropped."""

    texts: dict[str, str] = field(default_factory=dict)
    torn: dict[str, int] = field(default_factory=dict)


def _lines(path: Path) -> tuple[list[str], int]:
    """The lines of `path`, and how many torn (or blank) trailing lines were dropped."""
    data = path.read_bytes().decode("utf-8", errors="replace")
    lines = data.split("\n")  # not splitlines(): JSON strings may hold U+2028 and the like
    if lines and not lines[-1]:
        lines.pop()
    kept = len(lines)
    while kept:
        if lines[kept - 1].strip():
            try:
                json.loads(lines[kept - 1])
                break
            except ValueError:
                pass
        kept -= 1
    return lines[:kept], len(lines) - kept


def _damaged(path: Path, number: int, what: str, fix: str) -> InputError:
    return InputError(f"The tuning log file {path} is damaged at line {number}: {what}. {fix}")


def _delete_fix(path: Path, number: int) -> str:
    return f"Delete that line: `sed -i '{number}d' {path}`."


def _record_fix(path: Path, number: int) -> str:
    return (f"Delete that line (`sed -i '{number}d' {path}`): the other records stay usable. "
            "Or tune into a new --log DIR.")


def _workload_fix() -> str:
    return ("A workload line cannot be deleted (the records after it would point at the "
            "wrong workloads): restore the log from a copy, or tune into a new --log DIR.")


def _run_secs_problem(run_secs) -> str | None:
    if run_secs is None:
        return None
    if not isinstance(run_secs, list):
        return f"its run times are {str(run_secs)[:40]}, not a list"
    for value in run_secs:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"it has a run time of {str(value)[:40]}, which is not a number"
        if not math.isfinite(value) or value <= 0:
            return (f"it has a run time of {value} s; a measured run time is a positive "
                    "number")
    return None


def check_files(directory: Path) -> CheckedLog:
    """Read and check the workloads and records of the log in `directory` (either file may be
    missing); an InputError naming the first damaged line."""
    from tvm.s_tir.meta_schedule.database import TuningRecord, Workload

    from .schedules.cpu import intrinsics

    intrinsics.register()  # records name the tensor intrinsics their schedules use
    texts, torn = {}, {}
    workloads = []
    path = directory / WORKLOADS_FILE
    if path.is_file():
        lines, torn[WORKLOADS_FILE] = _lines(path)
        texts[WORKLOADS_FILE] = "".join(line + "\n" for line in lines)
        for number, line in enumerate(lines, 1):
            if not line.strip():  # MetaSchedule fails on an empty line; deleting it is safe
                raise _damaged(path, number, "it is empty", _delete_fix(path, number))
            try:
                workloads.append(Workload.from_json(json.loads(line)))
            except Exception as exc:  # noqa: BLE001 - json, base64 and TVM's parser errors
                raise _damaged(path, number, "its workload (a kernel) cannot be read "
                               f"({last_line(str(exc), type(exc).__name__)[:160]})",
                               _workload_fix()) from None
    path = directory / RECORDS_FILE
    if path.is_file():
        lines, torn[RECORDS_FILE] = _lines(path)
        texts[RECORDS_FILE] = "".join(line + "\n" for line in lines)
        for number, line in enumerate(lines, 1):
            if not line.strip():
                raise _damaged(path, number, "it is empty", _delete_fix(path, number))
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise _damaged(path, number, f"it is not a JSON record ({exc})",
                               _record_fix(path, number)) from None
            problem = _record_problem(record, len(workloads))
            if problem is None:
                try:
                    TuningRecord.from_json(record[1], workloads[record[0]])
                except Exception as exc:  # noqa: BLE001 - TVM's parser errors
                    problem = ("its schedule cannot be read "
                               f"({last_line(str(exc), type(exc).__name__)[:160]})")
            if problem is not None:
                raise _damaged(path, number, problem, _record_fix(path, number))
    return CheckedLog(texts, {name: count for name, count in torn.items() if count})


def _record_problem(record, workloads: int) -> str | None:
    if not (isinstance(record, list) and len(record) == 2 and isinstance(record[1], list)
            and len(record[1]) == 4):
        return "it is not a record ([workload, [trace, run times, target, arguments]])"
    index = record[0]
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < workloads:
        return (f"it is a record of workload {index}, and {WORKLOADS_FILE} holds workloads 0 "
                f"to {workloads - 1}" if workloads else
                f"it is a record of workload {index}, and {WORKLOADS_FILE} holds none")
    return _run_secs_problem(record[1][1])


__all__ = ["CheckedLog", "RECORDS_FILE", "WORKLOADS_FILE", "check_files"]
