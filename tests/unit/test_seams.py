"""The target kind is decided in one seam: targets.py (what a target is), lower.py (which
schedules package lowers it), schedules/ (each kind's own), devices/ (where it runs) and
runtime.py (which TVM device a library loads on). Anywhere else a branch on the kind is how a
new kind ends up needing edits in eight files."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SEAM = {"qcompile/targets.py", "qcompile/lower.py", "qcompile/runtime.py"}
SEAM_DIRS = ("qcompile/devices/", "schedules/")
KIND_BRANCH = re.compile(r"\.is_gpu\b|kind(?:\.name)?\"?\]?\)? *[!=]= *\"(?:llvm|opencl)\"|"
                         r"\"adreno\" in ")


def test_no_branch_on_the_target_kind_outside_the_seam():
    found = []
    for path in list((ROOT / "qcompile").rglob("*.py")) + list((ROOT / "schedules").rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        if name in SEAM or name.startswith(SEAM_DIRS):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if KIND_BRANCH.search(line):
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_pattern_finds_a_branch():
    assert KIND_BRANCH.search('if target.is_gpu:')
    assert KIND_BRANCH.search('if tvm_target.kind.name != "llvm":')
    assert KIND_BRANCH.search('gpu = target.kind == "opencl"')
