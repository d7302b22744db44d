"""Checkpoint writing: one host copy of the state, a CRC over that copy, a format that old
checkpoints still load in."""

from __future__ import annotations

import zipfile
import zlib
from collections import OrderedDict

import pytest
import torch

from lmkit.errors import CheckpointError
from lmkit.training import checkpoint as ckpt
from lmkit.training.checkpoint import host_copy, load_checkpoint, save_checkpoint, tensor_checksum


def small_state() -> dict:
    return {"model": OrderedDict(w=torch.arange(6, dtype=torch.float32).reshape(2, 3),
                                 b=torch.tensor([1.5, -2.0], dtype=torch.bfloat16)),
            "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2, 3)}},
                          "param_groups": [{"lr": 1e-3, "params": [0]}]},
            "step": 3, "rng": {"python": [3, (1, 2), None]}}


def test_checksum_is_the_one_older_checkpoints_carry():
    # computed by the lmkit before the single-host-copy change (format 2): files it wrote
    # must keep verifying
    assert tensor_checksum(small_state()) == ("fc49c7ac", 4)
    assert ckpt.FORMAT == 2


def test_threaded_checksum_gives_the_single_chain_value(monkeypatch):
    monkeypatch.setattr(ckpt, "_CRC_PIECE", 8)  # 8-byte pieces: w (24 bytes) is CRC'd as 3 joined pieces
    for threads in (1, 2, 3):
        assert tensor_checksum(small_state(), threads=threads) == ("fc49c7ac", 4)


@pytest.mark.parametrize("len_a, len_b", [(0, 0), (1, 0), (0, 7), (13, 1), (1000, 4096), (3, 1 << 20)])
def test_crc32_combine_matches_zlib_over_the_concatenation(len_a, len_b):
    a, b = bytes(range(256)) * (len_a // 256 + 1), bytes(reversed(range(256))) * (len_b // 256 + 1)
    a, b = a[:len_a], b[:len_b]
    assert ckpt.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_host_copy_of_a_cpu_state_copies_nothing():
    state = small_state()
    copy = host_copy(state)
    assert copy["model"]["w"] is state["model"]["w"] and copy["optimizer"]["state"][0]["exp_avg"] is \
        state["optimizer"]["state"][0]["exp_avg"]
    assert type(copy["model"]) is OrderedDict and copy["rng"]["python"][1] == (1, 2)


def test_save_reads_the_state_once_and_the_file_verifies(tmp_path, monkeypatch):
    seen = []
    real = ckpt.tensor_checksum
    monkeypatch.setattr(ckpt, "tensor_checksum", lambda s: seen.append(s) or real(s))
    path = tmp_path / "latest.pt"
    save_checkpoint(small_state(), path)
    assert len(seen) == 1  # one CRC pass at save
    state = load_checkpoint(path)
    assert state["manifest"] == {"format": 2, "checksum": "fc49c7ac", "tensors": 4, "step": 3}
    assert torch.equal(state["model"]["b"], small_state()["model"]["b"]) and state["model"]["b"].dtype == torch.bfloat16
    # a flipped byte inside a tensor's bytes on disk is caught
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.file_size == 24)  # w: 6 float32
    start = info.header_offset + 30 + int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little") \
        + int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    data[start + 5] ^= 0x10
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(flipped)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_state_is_copied_to_the_host_once_per_storage(tmp_path, monkeypatch):
    weight = torch.randn(8, 4, device="cuda")
    state = {"model": OrderedDict(wte=weight, head=weight, row=weight[2]), "optimizer": {"m": torch.ones(3, device="cuda")},
             "step": 1}
    copies = []
    real_cpu = torch.UntypedStorage.cpu
    monkeypatch.setattr(torch.UntypedStorage, "cpu", lambda self: copies.append(self.nbytes()) or real_cpu(self))
    devices = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: devices.extend(
        t.device.type for t in (obj["model"]["wte"], obj["model"]["row"], obj["optimizer"]["m"])) or real_save(obj, f))
    save_checkpoint(state, tmp_path / "c.pt")
    assert sorted(copies) == [12, 128] and set(devices) == {"cpu"}  # two storages, one copy each
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(loaded["model"]["head"], weight.cpu()) and torch.equal(loaded["model"]["row"], weight[2].cpu())
    assert loaded["model"]["wte"].untyped_storage().data_ptr() == loaded["model"]["head"].untyped_storage().data_ptr()
