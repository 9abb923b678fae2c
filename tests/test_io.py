"""gkl.io: writes land whole or not at all, beside the target, with no temporary file left."""

import json

import pytest
import torch

from gkl.io import TEMP_SUFFIX, atomic_open, atomic_torch_save, atomic_write_json


def test_json_and_torch_round_trip(tmp_path):
    atomic_write_json(tmp_path / "sub" / "m.json", {"acc": 0.5})
    assert json.loads((tmp_path / "sub" / "m.json").read_text()) == {"acc": 0.5}
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "w.pt")
    loaded = torch.load(tmp_path / "w.pt", weights_only=True)
    assert torch.equal(loaded["w"], torch.arange(3))
    assert not list(tmp_path.rglob(f"*{TEMP_SUFFIX}"))


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(target, "w") as handle:
        handle.write("half")
        # the temporary file is beside the target, not in $TMPDIR
        assert list(tmp_path.glob(f".state.json.*{TEMP_SUFFIX}"))
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert not list(tmp_path.glob(f"*{TEMP_SUFFIX}"))


def test_bad_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mode"), atomic_open(tmp_path / "x", "a"):
        pass
