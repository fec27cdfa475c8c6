"""Writing files safely, without a build: atomic replacement, the staging directories a killed
build leaves, the files a build owns in OUT_DIR, and tracker addresses."""

import os
import subprocess
import sys

import pytest

from qcompile.artifact import OWN_FILES
from qcompile.errors import DeviceError
from qcompile.paths import remove_stale_staging, write_atomically


def test_a_rewrite_replaces_the_file_whole_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "log.json"
    path.write_text("old\n")
    inode = path.stat().st_ino
    write_atomically(path, "new\n")
    assert path.read_text() == "new\n"
    assert path.stat().st_ino != inode  # a new file took its name: never half of one
    assert [p.name for p in tmp_path.iterdir()] == ["log.json"]


def test_only_staging_of_processes_that_are_gone_is_removed(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale, alive, mine, other = (tmp_path / f".qcompile-{gone}-a", tmp_path / ".qcompile-1-b",
                                 tmp_path / f".qcompile-{os.getpid()}-c", tmp_path / "keep-1-d")
    for directory in (stale, alive, mine, other):
        directory.mkdir()
    assert remove_stale_staging(tmp_path) == [stale]
    assert alive.is_dir() and mine.is_dir() and other.is_dir()


def test_every_report_a_build_writes_is_one_it_owns():
    from qcompile.auto import RULES_FILE, SEARCH_FILE
    from qcompile.decoder.compile import DECODER_FILE
    from qcompile.decoder.text import GENERATION, TOKENIZER
    from qcompile.prune import REPORT_FILE as PRUNING
    from qcompile.quantize.report import REPORT_FILE

    assert {"model.so", "model.json", REPORT_FILE, RULES_FILE, SEARCH_FILE, DECODER_FILE,
            TOKENIZER, GENERATION, PRUNING} == set(OWN_FILES)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9190", ("127.0.0.1", 9190)),
    ("[::1]:9190", ("::1", 9190)),
    ("phone.local:65535", ("phone.local", 65535)),
])
def test_tracker_addresses(text, expected):
    from qcompile.devices.tracker import address_text, parse_tracker

    assert parse_tracker(text) == expected
    assert address_text(expected) == text


@pytest.mark.parametrize("text, message", [
    ("127.0.0.1:99999", "port 99999"), ("127.0.0.1:0", "port 0"), ("[::1]", "malformed"),
    (":9190", "malformed"), ("host:port", "malformed"),
])
def test_tracker_addresses_out_of_range(text, message):
    from qcompile.devices.tracker import parse_tracker

    with pytest.raises(DeviceError, match=message):
        parse_tracker(text)
