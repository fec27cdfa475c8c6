"""Damaged tuning logs: refused when the log is opened, before the model is even read, with a
paragraph naming the file, the line and the fix (exit code 2), by compile and by tune alike; the
log's files are never rewritten by compile, and a tune's repair of a torn last line replaces the
file whole."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

import qcompile
from models import conv_relu
from qcompile.cli import main
from qcompile.tuning_log import INFO_FILE, RECORDS_FILE, open_log, repair
from qcompile.tuning_log_check import WORKLOADS_FILE


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """conv_relu tuned briefly on this machine: a small real log."""
    work = tmp_path_factory.mktemp("bad-logs")
    onnx.save(conv_relu(), str(work / "model.onnx"))
    qcompile.tune(work / "model.onnx", "host", work / "log", trials=2)
    records = (work / "log" / RECORDS_FILE).read_text().splitlines()
    assert len(records) >= 2  # a damaged first line is one in the middle of the file
    return work


def _lines(path):
    return path.read_text().splitlines(keepends=True)


def _record(index: int, run_secs):
    def damage(log):
        lines = _lines(log / RECORDS_FILE)
        record = json.loads(lines[0])
        record[0] = index if index is not None else record[0]
        record[1][1] = run_secs if run_secs is not None else record[1][1]
        lines[0] = json.dumps(record) + "\n"
        (log / RECORDS_FILE).write_text("".join(lines))
    return damage


def _replace_first(name, text):
    def damage(log):
        lines = _lines(log / name)
        lines[0] = text(lines[0])
        (log / name).write_text("".join(lines))
    return damage


DAMAGES = {
    "corrupt record": (_replace_first(RECORDS_FILE, lambda _: '{"garbage": [1,2\n'),
                       RECORDS_FILE, "not a JSON record", "sed -i '1d'"),
    "not a record": (_replace_first(RECORDS_FILE, lambda _: "[0, 1]\n"),
                     RECORDS_FILE, "it is not a record", "sed -i '1d'"),
    "missing workload": (_record(99, None), RECORDS_FILE, "record of workload 99",
                         "sed -i '1d'"),
    "negative time": (_record(None, [-5.0]), RECORDS_FILE, "run time of -5.0 s",
                      "sed -i '1d'"),
    "infinite time": (_record(None, [float("inf")]), RECORDS_FILE, "run time of inf s",
                      "sed -i '1d'"),
    "damaged workload": (_replace_first(WORKLOADS_FILE, lambda line: line[:200] + "@@@"
                                        + line[203:]),
                         WORKLOADS_FILE, "workload (a kernel) cannot be read",
                         "restore the log from a copy"),
}


@pytest.mark.parametrize("verb", ["compile", "tune"])
@pytest.mark.parametrize("case", list(DAMAGES))
def test_a_damaged_log_is_refused_before_any_work(tuned, tmp_path, capsys, caplog, verb, case):
    damage, name, what, fix = DAMAGES[case]
    log = tmp_path / "log"
    shutil.copytree(tuned / "log", log)
    damage(log)
    before = {path.name: path.read_bytes() for path in log.iterdir() if path.is_file()}
    args = (["compile", str(tuned / "model.onnx"), "-o", str(tmp_path / "out"),
             "--tuning-log", str(log)] if verb == "compile" else
            ["tune", str(tuned / "model.onnx"), "--log", str(log), "--trials", "4"])
    with caplog.at_level("INFO", logger="qcompile"):
        assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{log / name} is damaged at line 1" in err and what in err and fix in err
    assert "importing" not in caplog.text  # refused before the model was read
    assert {path.name: path.read_bytes() for path in log.iterdir() if path.is_file()} == before
    assert not (tmp_path / "out").exists()


def test_compile_ignores_a_torn_last_line_without_rewriting_the_log(tuned, tmp_path, caplog):
    log = tmp_path / "log"
    shutil.copytree(tuned / "log", log)
    lines = _lines(log / RECORDS_FILE)
    torn = "".join(lines) + lines[-1][: len(lines[-1]) // 2]
    (log / RECORDS_FILE).write_text(torn)
    with caplog.at_level("WARNING", logger="qcompile"):
        opened = open_log(log)
    assert "torn" in caplog.text
    assert (log / RECORDS_FILE).read_text() == torn  # the user's file is left as it is
    assert len(opened.database().get_all_tuning_records()) == len(lines)
    assert main(["compile", str(tuned / "model.onnx"), "-o", str(tmp_path / "out"),
                 "--tuning-log", str(log)]) == 0
    assert (log / RECORDS_FILE).read_text() == torn


def test_a_tune_drops_a_torn_last_line_by_replacing_the_file(tuned, tmp_path):
    log = tmp_path / "log"
    shutil.copytree(tuned / "log", log)
    lines = _lines(log / RECORDS_FILE)
    (log / RECORDS_FILE).write_text("".join(lines) + lines[-1][:10])
    assert repair(log) == 1
    assert (log / RECORDS_FILE).read_text() == "".join(lines)
    assert sorted(p.name for p in log.iterdir() if p.is_file()) == sorted(
        [INFO_FILE, RECORDS_FILE, WORKLOADS_FILE])  # no temporary file left beside them


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp.joinpath("afile").write_text("x") and tmp / "afile", "is a file"),
    (lambda tmp: tmp.joinpath("afile").write_text("x") and tmp / "afile" / "log",
     "is under the file"),
])
def test_tune_log_that_is_a_file_is_refused(tuned, tmp_path, capsys, make, message):
    log = make(tmp_path)
    assert main(["tune", str(tuned / "model.onnx"), "--log", str(log), "--trials", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err and "--log" in err
