"""The dashboard and the plain log of a run on several processes (DDP / FSDP under torchrun),
from synthetic events: every local rank's GPU marked in the GPU panel, "N processes (DDP)" in
the header and the run line, tokens/s shown global and per GPU (``StepMetrics.tok_per_s`` is
global under data parallelism)."""

from __future__ import annotations

import io
import re

from rich.console import Console

from lmkit.events import RunStarted, StepMetrics
from lmkit.monitor.console import PlainLog, RichProgress
from lmkit.monitor.dashboard import Dashboard
from lmkit.monitor.nvml import GpuStat
from lmkit.monitor.sampler import HostStat, SystemSample

GiB = 2**30
HOST = HostStat(rss_bytes=GiB, cpu_percent=90.0, n_cpus=16, threads=9, mem_used_bytes=5 * GiB,
                mem_total_bytes=64 * GiB)
UUIDS = ("GPU-aaaa", "GPU-bbbb", "GPU-cccc", "GPU-dddd", "GPU-eeee", "GPU-ffff")


def started(world_size: int = 1, parallelism: str | None = None, local: tuple[str, ...] = (),
            device: str = "cuda:0", device_uuid: str | None = "GPU-aaaa") -> RunStarted:
    return RunStarted(name="multi", run_dir="runs/multi", preset="tiny", model_type="gpt", n_params=123_456,
                      device=device, device_name="cuda:0 (NVIDIA H200, 139.8 GiB)" if device != "cpu" else "cpu",
                      precision="bf16", compile=False, max_steps=100, steps_per_epoch=10, tokens_per_step=4096,
                      device_uuid=device_uuid, world_size=world_size, parallelism=parallelism,
                      local_device_uuids=local)


def step(tok_per_s: float = 17_300.0) -> StepMetrics:
    return StepMetrics(step=10, max_steps=100, epoch=1.0, tokens=40_960, loss=3.2, lr=3e-4, grad_norm=0.5,
                       tok_per_s=tok_per_s, step_time_s=0.25, mfu=0.4, gpu_mem_gb=10.0, elapsed_s=2.5)


def gpus(n: int) -> list[GpuStat]:
    return [GpuStat(index=i, name="NVIDIA H200", uuid=UUIDS[i], util_percent=50.0, mem_used_bytes=GiB,
                    mem_total_bytes=140 * GiB, temperature_c=40.0, power_w=300.0, power_limit_w=700.0)
            for i in range(n)]


def render(dash: Dashboard, width: int = 160, height: int = 50) -> str:
    console = Console(record=True, width=width, height=height, force_terminal=True, color_system="truecolor")
    console.print(dash)
    return console.export_text()


def marked(text: str) -> set[int]:
    return {int(i) for i in re.findall(r"▶GPU(\d+)", text)}


def test_gpu_panel_marks_every_local_rank_gpu():
    # ranks 0 and 1 of this node on GPUs 0 and 2 (CUDA_VISIBLE_DEVICES=0,2): GPUs 1 and 3 are someone else's
    dash = Dashboard(live=False, sampler=False)
    dash(started(world_size=2, parallelism="ddp", local=("GPU-aaaa", "GPU-cccc")))
    dash(step())
    dash.update_system(SystemSample(gpus=gpus(4), host=HOST))
    text = render(dash)
    assert marked(text) == {0, 2}
    assert "2 used here · 2 processes (DDP)" in text
    # the compact layout (more than 4 GPUs) marks them the same way
    dash.update_system(SystemSample(gpus=gpus(6), host=HOST))
    assert marked(render(dash)) == {0, 2}


def test_gpu_panel_one_process_marks_its_device_uuid():
    dash = Dashboard(live=False, sampler=False)
    dash(started(device_uuid="GPU-bbbb"))
    dash(step())
    dash.update_system(SystemSample(gpus=gpus(4), host=HOST))
    text = render(dash)
    assert marked(text) == {1}
    assert "processes" not in text and "per GPU" not in text


def test_header_and_stats_show_processes_and_per_gpu_tokens_per_second():
    dash = Dashboard(live=False, sampler=False)
    dash(started(world_size=4, parallelism="fsdp", local=UUIDS[:4]))
    dash(step(tok_per_s=17_300.0))
    dash.update_system(SystemSample(gpus=gpus(4), host=HOST))
    text = render(dash)
    assert "4 processes (FSDP)" in text.splitlines()[1]  # the header's line
    assert re.search(r"tok/s\s+17\.3k all · 4\.33k per GPU", text), text  # 17,300 / 4 = 4,325
    assert re.search(r"MFU\s+40\.0%", text)  # MFU is already per device: shown as it comes
    assert marked(text) == {0, 1, 2, 3}


def test_plain_log_run_line_and_per_gpu_tokens_per_second():
    out = io.StringIO()
    log = PlainLog(out)
    log(started(world_size=2, parallelism="ddp", local=("GPU-aaaa", "GPU-bbbb")))
    log(step(tok_per_s=17_300.0))
    text = out.getvalue()
    assert "[cuda:0] | 2 processes (DDP) | bf16" in text
    assert "| 17.3k tok/s (8.65k/GPU) |" in text  # global, and 17,300 / 2 per GPU

    # on the CPU (gloo) the share is per process; parallelism None under world size > 1 means DDP
    out = io.StringIO()
    log = PlainLog(out)
    log(started(world_size=2, device="cpu", device_uuid=None))
    log(step(tok_per_s=1_000.0))
    assert "2 processes (DDP)" in out.getvalue() and "| 1k tok/s (500/process) |" in out.getvalue()


def test_plain_log_one_process_unchanged():
    out = io.StringIO()
    log = PlainLog(out)
    log(started())
    log(step(tok_per_s=17_300.0))
    text = out.getvalue()
    assert "processes" not in text and "/GPU" not in text
    assert "| 17.3k tok/s | 250 ms/step |" in text


def test_rich_progress_shows_per_gpu_tokens_per_second():
    console = Console(record=True, width=200, force_terminal=True)
    progress = RichProgress(console)
    try:
        progress(started(world_size=4, parallelism="ddp", local=UUIDS[:4]))
        progress(step(tok_per_s=20_000.0))
        task = progress.progress.tasks[0]
        assert "20k tok/s (5k/GPU)" in task.fields["stats"]
    finally:
        progress.close()
    assert "4 processes (DDP)" in console.export_text()
