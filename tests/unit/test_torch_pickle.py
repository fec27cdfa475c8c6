"""The example's checkpoint reader runs no code from the file: every pickle in it, the header
ones included, may name only what a state dict needs."""

import os
import pickle

import pytest

from qcompile.examples.torch_pickle import load_state_dict


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("position", [0, 1, 2, 4])  # magic, protocol, system info, keys
def test_a_global_in_any_pickle_is_refused(position, tmp_path):
    marker = tmp_path / "ran"
    parts = [0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, {}, []]
    parts[position] = _Payload(marker)
    path = tmp_path / "weights.pth"
    with open(path, "wb") as f:
        for part in parts:
            pickle.dump(part, f)
    with pytest.raises(pickle.UnpicklingError, match="unexpected global"):
        load_state_dict(path)
    assert not marker.exists()
