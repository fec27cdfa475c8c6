"""Helper processes (trackers, device servers) that run in their own process group.

TVM's tracker and RPC server re-execute Python for their workers; stopping only the first
process would leave the workers running, so everything is stopped by process group.
"""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group led by `process`, SIGKILL it after `grace` seconds."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    else:  # workers of the group may outlive their leader
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
