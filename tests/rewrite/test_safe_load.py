"""rewrite.safe_load: the static pickle scan, the runtime guard, and the trust_remote_code opt-in."""
from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

import rewrite
from rewrite import safe_load
from rewrite.cli import main
from rewrite.errors import ModelLoadError, UnsafeModelError


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class Weighted(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.softmax(self.proj(x), -1)


def _rewrite_member(src: Path, dst: Path, suffix: str, data: bytes, pickle_weights: bool = False) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            body = zin.read(info)
            if info.filename.endswith(suffix):
                body = data
            elif pickle_weights and info.filename.endswith("model_weights_config.json"):
                config = json.loads(body)
                for entry in config["config"].values():
                    entry["use_pickle"] = entry["path_name"] == suffix.rsplit("/", 1)[-1]
                body = json.dumps(config).encode()
            zout.writestr(info, body)
    return dst


@pytest.fixture()
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(Weighted(), (torch.randn(2, 4),)), path)
    return path


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_pickle_globals_sees_every_protocol(protocol: int) -> None:
    found = safe_load.pickle_globals(pickle.dumps(Payload("x"), protocol=protocol))
    assert found and found[0].endswith(".open"), found


def test_payload_refused_with_member_and_global(good: Path, tmp_path: Path) -> None:
    marker = tmp_path / "RAN"
    evil = _rewrite_member(good, tmp_path / "evil.pt2", "data/sample_inputs/model.pt",
                           pickle.dumps(Payload(str(marker)), protocol=2))
    with pytest.raises(UnsafeModelError, match=r"sample_inputs/model\.pt pickles global io\.open"):
        rewrite.inspect(evil)
    assert not marker.exists()


def test_runtime_guard_alone_blocks_the_payload(good: Path, tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "RAN"
    evil = _rewrite_member(good, tmp_path / "evil.pt2", "data/sample_inputs/model.pt",
                           pickle.dumps(Payload(str(marker)), protocol=2))
    monkeypatch.setattr(safe_load, "check_pt2_archive", lambda path: None)  # as if the scan had missed it
    with pytest.raises(ModelLoadError):
        rewrite.inspect(evil)
    assert not marker.exists()


def test_trust_remote_code_is_the_only_way_to_unpickle_freely(good: Path, tmp_path: Path) -> None:
    marker = tmp_path / "RAN"
    evil = _rewrite_member(good, tmp_path / "evil.pt2", "data/sample_inputs/model.pt",
                           pickle.dumps(Payload(str(marker)), protocol=2))
    assert main(["inspect", str(evil)]) == 2 and not marker.exists()
    with pytest.raises(ModelLoadError):  # the payload is not a program's inputs, so loading still fails after it
        rewrite.inspect(evil, trust_remote_code=True)
    assert marker.exists()  # the opt-in does what its name says
    marker.unlink()
    assert main(["inspect", str(evil), "--trust-remote-code"]) == 2
    assert marker.exists()


def test_pickled_tensor_members_still_load(good: Path, tmp_path: Path) -> None:
    """A weight stored with torch.save (use_pickle) holds only tensor globals: accepted, and the program loads."""
    buf = io.BytesIO()
    torch.save(torch.nn.Parameter(torch.ones(4, 4)), buf)
    pickled = _rewrite_member(good, tmp_path / "pickled.pt2", "data/weights/weight_0", buf.getvalue(),
                              pickle_weights=True)
    safe_load.check_pt2_archive(pickled)
    report = rewrite.inspect(pickled).to_dict()
    assert report["graph"] == "fx"


def test_checkpoint_is_weights_only(tmp_path: Path) -> None:
    from passes.transfer import load_checkpoint_params
    from passes.transfer.transfer import TransferError
    marker = tmp_path / "RAN"
    torch.save(Payload(str(marker)), tmp_path / "evil.pt")
    with pytest.raises(TransferError, match="weights-only"):
        load_checkpoint_params(tmp_path / "evil.pt")
    assert not marker.exists()


def test_raw_storage_bytes_that_look_like_a_pickle_are_not_refused(good: Path, tmp_path: Path) -> None:
    """Inside a torch.save zip only data.pkl is unpickled; a storage starting with 0x80 is just data."""
    weight = torch.nn.Parameter(torch.frombuffer(bytearray(b"\x80\x02" + bytes(62)), dtype=torch.float32).reshape(4, 4))
    buf = io.BytesIO()
    torch.save(weight, buf)
    pickled = _rewrite_member(good, tmp_path / "pickled.pt2", "data/weights/weight_0", buf.getvalue(),
                              pickle_weights=True)
    safe_load.check_pt2_archive(pickled)
