"""Tuning logs: directories holding a MetaSchedule JSON database (workloads + measured records)
plus `qcompile-log.json`, which says what the records were measured for.

A log is only worth applying to the target and TVM version it was measured with: another TVM
may generate different code from the same schedule, and another instruction set packs int8
weights differently (its workloads never match). `open_log` refuses such a log with the reason;
`shipped_log` picks the one shipped in tuning_logs/<target> when it fits, and says why not.

MetaSchedule appends a batch's records (up to 16 candidates) to database_tuning_record.json
once the whole batch is measured, so a tune killed by SIGKILL loses the batch being measured
(Ctrl-C and SIGTERM let it finish), and one killed while appending leaves a torn last line.
Opening a log checks every line first (tuning_log_check.py): a torn last line is dropped (in
memory by `open_log`, which never writes the user's log; in the file by `repair`, before a tune
appends to it), any other damage is refused naming the file and line. Every rewrite of a log's
file goes through a temporary file and os.replace.
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .paths import write_atomically
from .targets import Target
from .tuning_log_check import RECORDS_FILE, WORKLOADS_FILE, check_files

log = logging.getLogger(__name__)

INFO_FILE = "qcompile-log.json"
FORMAT = 1
# Records are keyed by a kernel's anchor block (its conv/matmul), not by the whole fused kernel:
# quantized kernels differ in their epilogue's literals (zero points, clip bounds), which change
# with the calibration data, and a record must still apply to the same conv of another model.
MODULE_EQUALITY = "anchor-block"


def identity(target: Target) -> dict[str, Any]:
    """What a log's records depend on: the TVM version and the code-generation target."""
    import tvm

    from .schedules.cpu.intrinsics import dot_product_for

    cpu = target.cpu
    dot = dot_product_for(target.to_tvm())
    return {
        "format": FORMAT,
        "module_equality": MODULE_EQUALITY,
        "tvm": tvm.__version__,
        "target": target.name,
        "kind": target.kind,
        "device": target.target.get("device"),
        "mtriple": cpu.get("mtriple") or f"{platform.machine()}-native",
        "mcpu": cpu.get("mcpu"),
        "mattr": sorted(cpu.get("mattr", [])),
        "int8_instruction": dot.instruction if dot is not None else None,
    }


def incompatibility(recorded: dict[str, Any], target: Target) -> str | None:
    """Why records measured for `recorded` must not be applied to `target` (None: they may)."""
    here = identity(target)
    if recorded.get("tvm") != here["tvm"]:
        return (f"it was measured with TVM {recorded.get('tvm')} and this is TVM "
                f"{here['tvm']}, whose code for the same schedules may differ")
    if recorded.get("module_equality", "structural") != MODULE_EQUALITY:
        return (f"its records are keyed by {recorded.get('module_equality', 'structural')} "
                f"equality, and qcompile now keys them by {MODULE_EQUALITY}")
    for key, what in (("kind", "target kind"), ("device", "GPU"), ("mtriple", "CPU triple"),
                      ("int8_instruction", "int8 dot-product instruction")):
        if recorded.get(key) != here[key]:
            return (f"it was measured for {what} {recorded.get(key)!r} (target "
                    f"'{recorded.get('target')}') and '{target.name}' has {here[key]!r}")
    return None


def differences(recorded: dict[str, Any], target: Target) -> str | None:
    """Differences that still let records apply but may make them less than the best here."""
    here = identity(target)
    changed = [f"{key} {recorded.get(key)!r} -> {here[key]!r}" for key in ("mcpu", "mattr")
               if recorded.get(key) != here[key]]
    return ", ".join(changed) or None


@dataclass(frozen=True)
class TaskSummary:
    """One tuned kernel: its name, uses in the model, records, and the best time measured."""

    name: str
    weight: int
    records: int
    best_us: float | None  # None: no candidate ran
    gops: float | None = None
    new_trials: int = 0      # measured by this run (the rest came from the log)
    seconds: float = 0.0     # this run's time on it
    default_us: float | None = None  # qcompile's default schedule, measured by this run

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.weight, "records": self.records,
                "best_us": self.best_us, "gops": self.gops, "new_trials": self.new_trials,
                "seconds": round(self.seconds, 1), "default_us": self.default_us}


@dataclass(frozen=True)
class TuningLog:
    """A directory holding a MetaSchedule JSON database (workloads + tuning records)."""

    directory: Path
    info: dict[str, Any] | None = None
    tasks: tuple[TaskSummary, ...] = ()
    seconds: float = 0.0
    device: str = "this machine"
    emulated: bool = False
    # {file name: text} to load instead of the files, when open_log dropped torn lines
    repaired: dict[str, str] | None = None

    def database(self):
        if not self.repaired:
            return open_database(self.directory)
        import shutil
        import tempfile

        # MetaSchedule reads a JSON database whole when it opens it: a copy of the repaired
        # files is only needed for that moment
        copy = Path(tempfile.mkdtemp(prefix="qcompile-log-"))
        try:
            for name, text in self.repaired.items():
                (copy / name).write_text(text)
            return open_database(copy)
        finally:
            shutil.rmtree(copy, ignore_errors=True)

    def describe(self) -> str:
        reused = sum(1 for t in self.tasks if t.new_trials == 0 and t.records)
        new = sum(t.new_trials for t in self.tasks)
        head = (f"tuned {len(self.tasks)} kernel(s) in {self.seconds:.0f} s on {self.device}: "
                f"{new} new measurement(s)"
                + (f", {reused} kernel(s) already tuned in the log (reused)" if reused else "")
                + (" (EMULATED: measured times are not the phone's)" if self.emulated else ""))
        rows = [f"  {'kernel':<44} {'uses':>4} {'records':>7} {'new':>5} {'best':>12} "
                f"{'GOPS':>7} {'default':>12}"]
        for t in self.tasks:
            best = f"{t.best_us:9.1f} us" if t.best_us is not None else "    no run"
            gops = f"{t.gops:7.1f}" if t.gops is not None else "      -"
            default = f"{t.default_us:9.1f} us" if t.default_us is not None else "           -"
            rows.append(f"  {t.name[:44]:<44} {t.weight:>4} {t.records:>7} {t.new_trials:>5} "
                        f"{best:>12} {gops} {default:>12}")
        return "\n".join([head, *rows, f"tuning log: {self.directory}"])


def mean_seconds(run_secs) -> float | None:
    """A record's mean run time, or None when it did not run."""
    if not run_secs:
        return None
    values = [float(t) for t in run_secs]
    mean = sum(values) / len(values)
    return mean if mean < 1e9 else None  # MetaSchedule stores failures as 1e10 s


def open_database(directory: Path, create: bool = False):
    """The MetaSchedule JSON database in `directory` (created when `create`), keyed the way
    qcompile keys records."""
    from tvm.s_tir import meta_schedule as ms

    from .schedules.cpu import intrinsics

    intrinsics.register()  # records name the tensor intrinsics their schedules use
    return ms.database.JSONDatabase(work_dir=str(directory), allow_missing=create,
                                    module_equality=MODULE_EQUALITY)


PRUNED_KEY = "pruned_trials"  # qcompile-log.json: {workload_key: candidates prune() dropped}
# qcompile-log.json: {workload_key: microseconds} of our default schedules measured into the log
DEFAULTS_KEY = "default_schedules_us"
# qcompile-log.json: what measured a GPU log's records instead of the GPU (tune --pocl)
STAND_IN_KEY = "measured_on_stand_in"
# qcompile-log.json: the threads each kernel ran on when measured on this machine (times taken
# with another count do not compare: a kernel's best schedule depends on it)
THREADS_KEY = "measured_threads"


def read_info(directory: Path) -> dict[str, Any] | None:
    path = directory / INFO_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_bytes())
    except ValueError as exc:  # also UnicodeDecodeError
        info = exc
    if not isinstance(info, dict):
        why = f"not valid JSON ({info})" if isinstance(info, Exception) else "not a JSON object"
        raise InputError(f"'{path}' is {why}: it should describe the target the tuning log "
                         "was measured for. Delete it only if you know the records are for "
                         "this target.")
    return info


def write_info(directory: Path, info: dict[str, Any]) -> None:
    write_atomically(directory / INFO_FILE, json.dumps(info, indent=1) + "\n")


def repair(directory: Path) -> int:
    """Check the log's lines (an InputError names a damaged one) and drop a torn last line (a
    tune killed while writing it) from the file itself; returns the lines dropped."""
    checked = check_files(directory)
    for name in checked.torn:
        write_atomically(directory / name, checked.texts[name])
    dropped = sum(checked.torn.values())
    if dropped:
        log.warning("tuning log %s: dropped %d torn line(s) left by an interrupted tune",
                    directory, dropped)
    return dropped


def open_log(directory: str | Path, target: Target | None = None) -> TuningLog:
    """An existing tuning log for `target`; an InputError naming what is missing, or why the
    log belongs to another target or TVM version."""
    directory = Path(directory)
    if not all((directory / name).is_file() for name in (WORKLOADS_FILE, RECORDS_FILE)):
        raise InputError(f"'{directory}' is not a tuning log: it should hold {WORKLOADS_FILE} "
                         f"and {RECORDS_FILE}, as written by `qcompile tune --log {directory}`.")
    checked = check_files(directory)
    if checked.torn:
        log.warning("tuning log %s: ignoring %d torn line(s) at the end of %s, left by an "
                    "interrupted tune (the files are left as they are; the next tune into "
                    "this log drops them)", directory, sum(checked.torn.values()),
                    " and ".join(checked.torn))
    info = read_info(directory)
    if target is not None and info is not None:
        why = incompatibility(info, target)
        if why is not None:
            raise InputError(f"The tuning log {directory} does not fit target '{target.name}': "
                             f"{why}. Tune for this target into another directory (`qcompile "
                             f"tune MODEL --target {target.name} --log DIR`), or compile "
                             "without --tuning-log.")
        if info.get(STAND_IN_KEY):
            log.warning("tuning log %s was measured on %s, not on the GPU: its schedules "
                        "were chosen for that device, not for this one", directory,
                        info[STAND_IN_KEY])
        changed = differences(info, target)
        if changed:
            log.warning("tuning log %s was measured on another CPU (%s): its schedules apply "
                        "but may not be the fastest here", directory, changed)
    elif target is not None:
        log.warning("tuning log %s does not say what it was measured for (no %s): applying "
                    "it as it is", directory, INFO_FILE)
    return TuningLog(directory, info, repaired=checked.texts if checked.torn else None)


def shipped_dir() -> Path:
    """tuning_logs/ of the source checkout, or the copy installed inside the package."""
    package = Path(__file__).resolve().parent
    installed = package / "data" / "tuning_logs"
    return installed if installed.is_dir() else package.parent / "tuning_logs"


def shipped_log(target: Target) -> TuningLog | None:
    """The log shipped in tuning_logs/<target> if it fits `target`; None (and why) if not."""
    directory = shipped_dir() / target.name
    if not (directory / RECORDS_FILE).is_file():
        log.info("no tuning log ships for %s: kernels get default schedules (tune them with "
                 "`qcompile tune`)", target.name)
        return None
    info = read_info(directory)
    why = incompatibility(info, target) if info is not None else "it has no " + INFO_FILE
    if why is not None:
        log.info("the shipped tuning log for %s does not fit here (%s): kernels get default "
                 "schedules", target.name, why)
        return None
    log.info("using the shipped tuning log %s (kernels it has no record for get default "
             "schedules)", directory)
    return TuningLog(directory, info)


def kernel_blocks(mod):
    """The top-level blocks of every kernel in `mod` (a log's workload, or a tuning task's)."""
    import tvm
    from tvm.s_tir import Schedule

    sch = Schedule(mod)
    for gvar, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            sch.work_on(gvar.name_hint)
            yield from (sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root")))


def sums_in_float(mod) -> bool:
    """Whether a kernel (a log's workload) reduces in floating point: a tuned schedule of it may
    add its terms in another order than the default, so its results may differ in the last
    bits. An integer kernel's sums are exact in any order."""
    from tvm.tirx import IterVar

    return any(any(int(iv.iter_type) == IterVar.CommReduce for iv in block.iter_vars)
               and any("float" in str(w.source.dtype) for w in block.writes)
               for block in kernel_blocks(mod))


def prune(source: str | Path, destination: str | Path, keep: int = 4,
          exact: bool = False, drop: frozenset[str] = frozenset()) -> int:
    """Copy the `keep` best valid records of each kernel of the log `source` into a new log
    `destination` (what ships in tuning_logs/: compile applies only the best one). `exact`:
    only the kernels whose results do not depend on the schedule (`sums_in_float` is false),
    so that a build with the log computes bit for bit what it computes without. `drop`: the
    `workload_key`s of kernels left out (their records lost to the default schedule; a later
    tune searches them again). Returns the number of records kept."""
    from tvm.s_tir.meta_schedule.database import TuningRecord

    source, destination = Path(source), Path(destination)
    log_ = open_log(source)
    database = log_.database()
    workloads = {}
    for record in database.get_all_tuning_records():
        workloads.setdefault(workload_key(record.workload.mod), record.workload)
    destination.mkdir(parents=True, exist_ok=True)
    for name in (WORKLOADS_FILE, RECORDS_FILE):
        (destination / name).unlink(missing_ok=True)
    out = open_database(destination, create=True)
    kept = 0
    earlier = dict((log_.info or {}).get(PRUNED_KEY, {}))
    pruned: dict[str, int] = {}
    dropped: set[str] = set()
    for key, workload in workloads.items():
        if key in drop or (exact and sums_in_float(workload.mod)):
            dropped.add(key)
            continue
        records = database.get_top_k(workload, 1_000_000)
        best = [r for r in records[:keep] if mean_seconds(r.run_secs) is not None]
        if best:
            copied = out.commit_workload(workload.mod)
            for r in best:
                out.commit_tuning_record(TuningRecord(
                    r.trace, copied, r.run_secs, r.target, r.args_info))
                kept += 1
            pruned[workload_key(copied.mod)] = earlier.get(key, 0) + len(records) - len(best)
    if log_.info is not None:
        info = {**log_.info, PRUNED_KEY: pruned}
        if DEFAULTS_KEY in info:  # a dropped kernel's default is measured again by a tune
            info[DEFAULTS_KEY] = {k: v for k, v in info[DEFAULTS_KEY].items()
                                  if k not in dropped}
        write_info(destination, info)
    return kept


def workload_key(mod) -> str:
    """A stable key for a log's workload (a kernel), as qcompile-log.json stores it."""
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod) & 0xFFFFFFFFFFFFFFFF:016x}"


def pruned_trials(info: dict[str, Any] | None, workload_mod) -> int:
    """How many measured candidates of this workload prune() dropped: they count towards a
    kernel's trial budget as if they were still in the log, so a tune on a shipped (pruned) log
    does not search the same kernel again."""
    return int(((info or {}).get(PRUNED_KEY) or {}).get(workload_key(workload_mod), 0))
