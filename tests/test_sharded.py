"""Sharded (FSDP2) checkpoints through Distributed Checkpoint: save on 2 gloo ranks, load on 2
ranks and on 1 plain process (DCP reshards), consolidation, the crash rule, tampering.

One 2-process job (torchrun's variables given by hand, ``OMP_NUM_THREADS=1``) trains a toy model
wrapped with ``fully_shard`` (uneven shards: 5 rows over 2 ranks), saves ``step_0000001.dcp`` and
``step_0000002.dcp`` (``latest.dcp`` linked to each), loads step 1 back into a model and
optimizer initialised differently, fails a save on rank 0 (an ``extra`` that is not data), and
finally dies (SIGKILL, the crash hook) in the middle of a save onto ``latest.dcp``, after every
file and the manifest are written and before the folder is put in place. The reference for every comparison is what
``get_state_dict(..., full_state_dict=True)`` returned right after the save: PyTorch's own
gathering of the sharded state, not lmkit's code.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lmkit.errors import CheckpointError
from lmkit.training.checkpoint import (
    checkpoint_by_name,
    link_checkpoint,
    load_checkpoint,
    newest_complete,
    peek_step,
    remove_stale_temp_files,
)
from lmkit.training.sharded import load_sharded, save_sharded

ENV = {"OMP_NUM_THREADS": "1", "LMKIT_THREADS": "1"}

TOY = '''
import torch
from torch import nn


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 12), nn.Linear(12, 12)])
        self.head = nn.Linear(12, 5, bias=False)
        self.register_buffer("scale", torch.arange(1.0, 6.0))

    def forward(self, x):
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x) * self.scale


def train_step(model, optimizer, seed):
    g = torch.Generator().manual_seed(seed)
    model(torch.randn(4, 8, generator=g)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
'''

WORKER = TOY + '''
import json, os, sys
from pathlib import Path
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.fsdp import fully_shard
from lmkit.training.checkpoint import link_checkpoint
from lmkit.training.distributed import Distributed
from lmkit.training.sharded import load_sharded, save_sharded

out = Path(sys.argv[1])
dist = Distributed.from_env()
dist.start(torch.device("cpu"))
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def build(seed, lr=1e-2):
    torch.manual_seed(seed)
    model = Toy()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=lr)


def save(model, optimizer, step, name):
    extra = {"step": step, "rng_ranks": dist.all_gather_object(torch.get_rng_state()), "config": {"x": 1}}
    size = save_sharded(model, optimizer, extra, out / name, dist)
    if dist.is_main:
        link_checkpoint(out / name, out / "latest.dcp")
    dist.barrier()
    return size


model, optimizer = build(0)
train_step(model, optimizer, 1)
sizes = [save(model, optimizer, 1, "step_0000001.dcp")]
reference = get_state_dict(model, optimizer, options=FULL)
if dist.is_main:
    torch.save({"model": reference[0], "optimizer": reference[1]}, out / "reference_1.pt")
train_step(model, optimizer, 2)
sizes.append(save(model, optimizer, 2, "step_0000002.dcp"))

fresh, fresh_opt = build(1, lr=0.5)  # the saved lr must come back too
train_step(fresh, fresh_opt, 3)
before = get_state_dict(fresh, fresh_opt, options=FULL)
extra = load_sharded(out / "step_0000001.dcp", fresh, fresh_opt, dist)
after = get_state_dict(fresh, fresh_opt, options=FULL)
if dist.is_main:
    torch.save({"before": before[0], "model": after[0], "optimizer": after[1]}, out / "loaded_2ranks.pt")
    (out / "result.json").write_text(json.dumps({"sizes": sizes, "extra_step": extra["step"],
                                                 "rng_ranks": len(extra["rng_ranks"])}))
dist.barrier()


class NotData:  # what weights_only cannot load: rank 0's save fails, and every rank says so
    pass


try:
    save_sharded(model, optimizer, {"step": 9, "bad": NotData()}, out / "step_0000009.dcp", dist)
except Exception as exc:
    (out / f"error_rank{dist.rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
os.environ["LMKIT_TEST_CRASH"] = os.environ.get("CRASH_ON_FOURTH", "")
train_step(model, optimizer, 4)
save_sharded(model, optimizer, {"step": 3}, out / "latest.dcp", dist)  # rank 0 dies before the rename
dist.finish(barrier=True)
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    path = [p for p in (os.environ.get("PYTHONPATH"), str(Path(__file__).parents[1])) if p]  # this tree's lmkit
    return {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join(path), **extra}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The 2-rank job's folder and the two processes' results."""
    out = tmp_path_factory.mktemp("sharded")
    script = out / "worker.py"
    script.write_text(WORKER)
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   CRASH_ON_FOURTH="save=4,at=after_manifest" if rank == 0 else "")
        procs.append(subprocess.Popen([sys.executable, str(script), str(out)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # a hang is a failure, never a stuck test run
            for p in procs:
                p.kill()
            raise
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    assert (out / "result.json").exists(), results[0].stderr[-3000:] + results[1].stderr[-3000:]
    return out, results


def _toy(lr: float = 1e-2) -> tuple[nn.Module, torch.optim.Optimizer]:
    namespace: dict = {}
    exec(compile(TOY, "toy", "exec"), namespace)  # noqa: S102 - the same toy the workers use
    torch.manual_seed(5)
    model = namespace["Toy"]()
    return model, torch.optim.AdamW(model.parameters(), lr=lr)


def _assert_equal_states(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    for key, value in want.items():
        if isinstance(value, dict):
            _assert_equal_states(got[key], value, f"{what}.{key}")
        elif isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), f"{what}.{key}"
        elif isinstance(value, list):
            assert len(got[key]) == len(value), f"{what}.{key}"
            for i, item in enumerate(value):
                _assert_equal_states({"i": got[key][i]}, {"i": item}, f"{what}.{key}.{i}")
        else:
            assert got[key] == value, f"{what}.{key}"


def test_two_ranks_save_then_load_on_two_ranks_is_equal(job):
    out, _ = job
    reference = torch.load(out / "reference_1.pt", weights_only=True)
    loaded = torch.load(out / "loaded_2ranks.pt", weights_only=True)
    assert not torch.equal(loaded["before"]["head.weight"], reference["model"]["head.weight"])  # not trivially equal
    _assert_equal_states(loaded["model"], reference["model"], "model")
    _assert_equal_states(loaded["optimizer"], reference["optimizer"], "optimizer")
    result = json.loads((out / "result.json").read_text())
    assert result["extra_step"] == 1 and result["rng_ranks"] == 2
    on_disk = sum(f.stat().st_size for f in (out / "step_0000001.dcp").iterdir())
    assert result["sizes"][0] == on_disk


def test_two_rank_checkpoint_loads_into_one_plain_process(job):
    """Resharding: the 2-rank folder into an unwrapped model and optimizer, no process group."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out, _ = job
    reference = torch.load(out / "reference_1.pt", weights_only=True)
    model, optimizer = _toy(lr=0.5)  # the saved lr (1e-2) must come back too
    extra = load_sharded(out / "step_0000001.dcp", model, optimizer)
    assert extra["step"] == 1 and extra["manifest"]["world_size"] == 2
    _assert_equal_states(model.state_dict(), reference["model"], "model")
    _assert_equal_states(get_state_dict(model, optimizer)[1], reference["optimizer"], "optimizer")
    assert optimizer.state_dict()["state"][0]["step"] == 1  # the optimizer really holds the saved state


def test_load_checkpoint_consolidates_like_a_full_state_dict(job):
    out, _ = job
    reference = torch.load(out / "reference_1.pt", weights_only=True)
    state = load_checkpoint(out / "step_0000001.dcp")
    _assert_equal_states(state["model"], reference["model"], "model")
    assert state["step"] == 1 and state["config"] == {"x": 1} and len(state["rng_ranks"]) == 2
    assert "optimizer" not in state
    assert peek_step(out / "step_0000002.dcp") == 2
    assert checkpoint_by_name(out, "step_0000001") == out / "step_0000001.dcp"


def test_a_save_failing_on_rank_0_fails_on_every_rank_and_leaves_nothing(job):
    out, _ = job
    for rank in (0, 1):
        text = (out / f"error_rank{rank}.txt").read_text()
        assert text.startswith("CheckpointError: ") and "step_0000009.dcp: the sharded save failed" in text, text
    assert "extra.pt: cannot be loaded (it contains Python objects" in (out / "error_rank0.txt").read_text()
    assert not any("step_0000009" in p.name for p in out.iterdir())


def test_latest_is_a_folder_of_hard_links_and_a_killed_save_is_never_picked(job):
    out, (rank0, rank1) = job
    assert rank0.returncode == -9, rank0.stderr[-2000:]  # killed by the crash hook
    assert rank1.returncode != 0  # its peer died mid-save: an error, not a hang
    latest, step2 = out / "latest.dcp", out / "step_0000002.dcp"
    for file in step2.iterdir():
        assert (latest / file.name).samefile(file)
    torn = [p for p in out.iterdir() if p.name.startswith(".latest.dcp.")]
    assert len(torn) == 1 and (torn[0] / "lmkit_manifest.json").exists()  # complete, but never put in place
    found, skipped = newest_complete(out)
    assert found.path == latest and found.state["step"] == 2 and skipped == []
    assert remove_stale_temp_files(out) == torn and not torn[0].exists()
    assert load_checkpoint(latest)["step"] == 2


CRASH_BETWEEN_RENAMES = TOY + '''
import sys
from pathlib import Path
from lmkit.training import sharded
from lmkit.training.distributed import Distributed

out = Path(sys.argv[1])
torch.manual_seed(0)
model = Toy()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
train_step(model, optimizer, 1)
sharded.save_sharded(model, optimizer, {"step": 1}, out / "latest.dcp", Distributed())
sharded._USE_EXCHANGE = False  # the fallback of file systems without renameat2(RENAME_EXCHANGE)
train_step(model, optimizer, 2)
sharded.save_sharded(model, optimizer, {"step": 2}, out / "latest.dcp", Distributed())  # dies
'''


def test_a_save_killed_between_the_fallback_renames_keeps_the_previous_folder(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASH_BETWEEN_RENAMES)
    out = tmp_path / "checkpoints"
    out.mkdir()
    proc = subprocess.run([sys.executable, str(script), str(out)], env=_env(LMKIT_TEST_CRASH="save=2,at=between_renames"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (out / "latest.dcp").exists()  # the moment between the two renames
    with pytest.raises(CheckpointError, match="no checkpoints"):
        newest_complete(out)  # neither temporary name is ever a candidate
    removed = remove_stale_temp_files(out)
    assert [p.name.endswith(".tmp") for p in removed] == [True]  # the new one; the old one is put back
    found, _ = newest_complete(out)
    assert found.path == out / "latest.dcp" and found.state["step"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["latest.dcp"]


@pytest.fixture
def copy_of_step1(job, tmp_path):
    out, _ = job
    target = tmp_path / "checkpoints" / "step_0000001.dcp"
    shutil.copytree(out / "step_0000001.dcp", target)
    return target


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_shard_is_refused_naming_the_file(copy_of_step1):
    shard = copy_of_step1 / "__1_0.distcp"
    _flip_byte(shard, shard.stat().st_size // 2)
    for load in (load_checkpoint, lambda p: load_sharded(p, *_toy())):
        with pytest.raises(CheckpointError, match=r"__1_0\.distcp: corrupt \(CRC-32 [0-9a-f]{8} != manifest"):
            load(copy_of_step1)
    link_checkpoint(copy_of_step1, copy_of_step1.parent / "latest.dcp")  # the same damaged files
    with pytest.raises(CheckpointError, match=r"no complete checkpoint \(latest\.dcp: .*__1_0\.distcp: corrupt"):
        newest_complete(copy_of_step1.parent)


def test_a_truncated_shard_or_tampered_manifest_is_refused(copy_of_step1):
    shard = copy_of_step1 / "__0_0.distcp"
    manifest_file = copy_of_step1 / "lmkit_manifest.json"
    original = manifest_file.read_text()
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: truncated or overwritten"):
        load_checkpoint(copy_of_step1)
    manifest = json.loads(original)
    manifest["step"] = 7
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"lmkit_manifest\.json: corrupt \(its checksum"):
        load_checkpoint(copy_of_step1)
    manifest_file.unlink()
    with pytest.raises(CheckpointError, match=r"step_0000001\.dcp: not an lmkit checkpoint \(no lmkit_manifest"):
        load_checkpoint(copy_of_step1)


def test_a_weights_only_folder_and_a_plain_single_process_save(tmp_path):
    """One process, no process group, no optimizer: the weights round-trip; asking for the
    optimizer state it does not hold is refused in one line."""
    from lmkit.training.distributed import Distributed

    model, optimizer = _toy()
    size = save_sharded(model, None, {"step": 4}, tmp_path / "w.dcp", Distributed())
    assert size == sum(f.stat().st_size for f in (tmp_path / "w.dcp").iterdir())
    other, other_opt = _toy()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    assert load_sharded(tmp_path / "w.dcp", other)["step"] == 4
    _assert_equal_states(other.state_dict(), model.state_dict(), "model")
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load_sharded(tmp_path / "w.dcp", other, other_opt)


def test_run_listings_find_folders_and_count_linked_ones_once(job, tmp_path):
    """``lmkit eval``'s list of checkpoints and ``svd-analyze``'s selection on a sharded run."""
    from lmkit.analysis.svd_analyze import select_checkpoints
    from lmkit.runs import list_checkpoints

    out, _ = job
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for name in ("step_0000001.dcp", "step_0000002.dcp"):
        link_checkpoint(out / name, checkpoints / name)
    link_checkpoint(checkpoints / "step_0000002.dcp", checkpoints / "latest.dcp")
    (checkpoints / ".step_0000003.dcp.0badf00d.tmp").mkdir()  # a torn save is never listed
    assert list_checkpoints(tmp_path / "run") == [(1, checkpoints / "step_0000001.dcp"),
                                                  (2, checkpoints / "step_0000002.dcp")]
    assert select_checkpoints(tmp_path / "run", ["best", "step_0000002", "step_0000001"]) == [
        (1, checkpoints / "step_0000001.dcp"), (2, checkpoints / "latest.dcp")]  # best -> latest; latest = step 2
    with pytest.raises(CheckpointError, match=r"step_0000009\.pt: no such checkpoint .*have: latest, step_0000001"):
        select_checkpoints(tmp_path / "run", ["step_0000009"])


def test_file_crc32_on_threads_equals_zlib_over_the_whole_file(tmp_path, monkeypatch):
    import zlib

    from lmkit.training import crc

    monkeypatch.setattr(crc, "_PIECE", 1000)  # 6 pieces, one short
    data = torch.randint(0, 256, (5321,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    (tmp_path / "f").write_bytes(bytes(data.tolist()))
    for threads in (1, 3):
        assert crc.file_crc32(tmp_path / "f", threads=threads) == f"{zlib.crc32(bytes(data.tolist())):08x}"


def test_metadata_pointing_outside_the_folder_is_refused(copy_of_step1):
    """DCP reads the files its metadata names: only files the manifest lists, inside the folder."""
    import pickle

    from lmkit.training.sharded_files import MANIFEST, _manifest_checksum, file_crc32, read_metadata

    folder = copy_of_step1
    metadata = read_metadata(folder)
    first = next(iter(metadata.storage_data))
    metadata.storage_data[first].relative_path = "../../outside.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][".metadata"] = {"bytes": (folder / ".metadata").stat().st_size,
                                      "crc32": file_crc32(folder / ".metadata")}
    manifest["checksum"] = _manifest_checksum(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"\.metadata: points at '\.\./\.\./outside\.distcp', which the manifest"):
        load_checkpoint(folder)
