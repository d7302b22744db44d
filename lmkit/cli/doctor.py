"""``lmkit doctor``: the machine (versions, GPUs, MPS, CPUs and their load, RAM) and, for a preset, its
parameter count, a memory breakdown of one training step and a verdict per GPU.

The CPU load is a 0.2 s system-wide sample (:func:`lmkit.analysis.environment.sample_cpu_load`): the
load average, the cores this process may use, the cores other processes keep busy and the three
busiest; a warning line says when torch's threads would have to wait for them (oversubscribed)."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.markup import escape
from rich.text import Text

from lmkit.cli._common import handle_errors
from lmkit.config import available_presets
from lmkit.errors import ConfigError, DeviceError

_PRESETS = ", ".join(available_presets())
_GiB = 2**30


def _optimizer_label(name: str) -> str:
    return "Muon + AdamW" if name == "muon" else "AdamW"


def _gib(n: int | None) -> str:
    """Bytes as GiB (or MiB below 1 GiB)."""
    if n is None:
        return "-"
    if n == 0:
        return "0"
    return f"{n / _GiB:.2f} GiB" if n >= _GiB else f"{n / 2**20:.1f} MiB"


def _yes(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def target_is_approximate(target: int) -> bool:
    """Whether a preset's ``target_params`` is a stated round target (at most two significant
    digits: scale_10m's 10,000,000) rather than the preset's own documented count
    (small's 44,909,056), against which a "difference from target" says nothing."""
    digits = str(abs(int(target))).rstrip("0")
    return len(digits) <= 2


def _target_label(target: int) -> str:
    if target % 1_000_000 == 0:
        return f"{target // 1_000_000}M"
    if target % 1_000 == 0:
        return f"{target // 1_000}k"
    return f"{target:,}"


@handle_errors
def doctor_command(
    preset: str = typer.Option(None, "--preset", "-p", help=f"Preset name ({_PRESETS}) or a YAML path: adds "
                               "its parameter count, memory breakdown and a verdict per GPU."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set model.n_layer=24 "
                                        "(repeatable)."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Sequences per micro-batch (default: the "
                                   "preset's)."),
    seq_len: int = typer.Option(None, "--seq-len", help="Tokens per sequence (default: block_size)."),
    fp16: bool = typer.Option(False, "--fp16", help="Estimate for fp16 autocast."),
    bf16: bool = typer.Option(False, "--bf16", help="Estimate for bf16 autocast."),
    fp32: bool = typer.Option(False, "--fp32", help="Estimate for fp32 (when the preset says otherwise)."),
    grad_checkpointing: bool = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing",
                                            help="Estimate with / without gradient checkpointing "
                                            "(default: the preset's)."),
    attention: str = typer.Option("sdpa", "--attention", help="sdpa (fused kernel, no T² scores) or eager "
                                  "(math kernel, stores the B·h·T² scores)."),
    gpu_memory: str = typer.Option(None, "--gpu-memory", help="Also judge a card of this size, e.g. 16GiB, "
                                   "24GB, 81920MiB (a bare number is GiB)."),
    gpu_only: bool = typer.Option(False, "--gpu-only", help="Exit 3 unless CUDA is available."),
    legacy_seed001: bool = typer.Option(False, "--legacy-hand-table", help="Also show the hand table of the "
                                        "WikiText GPT training guide (oonisim/python-programs) "
                                        "(fp32, 1.5 GB overhead, activations 4·(9·B·T·d + B·h·T²) per layer)."),
    legacy_old_name: bool = typer.Option(False, "--legacy-seed001", hidden=True),  # the flag's first name
    nproc: int = typer.Option(None, "--nproc", help="Also estimate each GPU's memory with N training processes "
                              "(torchrun --nproc-per-node N; --batch-size is per process)."),
    parallelism: str = typer.Option(None, "--parallelism", help="With --nproc: ddp (a full replica per GPU) or fsdp "
                                    "(sharded, fully_shard per block); default: the preset's training.parallelism, "
                                    "else ddp."),
    json_out: bool = typer.Option(False, "--json", help="Print everything as one JSON object (for bug reports)."),
) -> None:
    """Check the machine (python, torch, CUDA, cuDNN, driver, GPUs, MPS, CPUs and their load, RAM); with --preset,
    count parameters, estimate the memory of one training step and say whether it fits each GPU."""
    from lmkit.analysis import memory as mem
    from lmkit.analysis.environment import collect_environment

    legacy_seed001 = legacy_seed001 or legacy_old_name
    if sum((fp16, bf16, fp32)) > 1:
        raise ConfigError("--fp16, --bf16 and --fp32: choose one precision")
    if attention not in ("sdpa", "eager"):
        raise ConfigError(f"--attention {attention}: use sdpa or eager")
    capacity = mem.parse_memory_size(gpu_memory) if gpu_memory is not None else None
    if nproc is not None and nproc < 1:
        raise ConfigError(f"--nproc {nproc}: must be at least 1")
    if parallelism is not None and parallelism not in ("ddp", "fsdp"):
        raise ConfigError(f"--parallelism {parallelism}: use ddp or fsdp")
    if parallelism is not None and nproc is None:
        raise ConfigError("--parallelism: give the number of processes with --nproc N")
    if preset is None:
        asked = [name for name, value in (("--batch-size", batch_size), ("--seq-len", seq_len), ("--fp16", fp16),
                                          ("--bf16", bf16), ("--fp32", fp32), ("--gpu-memory", gpu_memory),
                                          ("--legacy-hand-table", legacy_seed001),
                                          ("--grad-checkpointing", grad_checkpointing), ("--set", overrides),
                                          ("--nproc", nproc))
                 if value]
        if asked:
            raise ConfigError(f"{asked[0]}: estimates need a model; add --preset NAME (e.g. --preset small)")

    env = collect_environment()
    report: dict[str, Any] = {"environment": env.to_dict()}
    if preset is not None:
        report.update(_preset_report(preset, overrides, batch_size, seq_len, fp16, bf16, fp32, grad_checkpointing,
                                     attention, capacity, gpu_memory, legacy_seed001, env))
        if nproc is not None:
            report["parallel"] = _parallel_report(preset, overrides, batch_size, seq_len, fp16, bf16, fp32,
                                                  grad_checkpointing, attention, nproc, parallelism, report, env)

    if json_out:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
    else:
        _render(report, env)
    if gpu_only and not env.cuda_available:
        raise DeviceError(f"--gpu-only: CUDA is not available ({env.cuda_note}); lmkit never falls back to the "
                          "CPU -- run on a machine with an NVIDIA GPU and a CUDA build of torch")


def _run_config(preset, overrides, batch_size, fp16, bf16, fp32, grad_checkpointing):
    """The run config doctor estimates for: the preset, ``--set`` overrides and doctor's flags."""
    from lmkit.config import build_run_config

    flags: dict[str, tuple[str, Any]] = {}
    if batch_size is not None:
        flags["training.batch_size"] = ("--batch-size", batch_size)
    for flag, value in (("--fp16", fp16), ("--bf16", bf16), ("--fp32", fp32)):
        if value:
            flags["training.precision"] = (flag, flag[2:])
    if grad_checkpointing is not None:
        flags["training.grad_checkpointing"] = ("--grad-checkpointing", grad_checkpointing)
    return build_run_config(preset, overrides, flags)


def _preset_report(preset, overrides, batch_size, seq_len, fp16, bf16, fp32, grad_checkpointing, attention,
                   capacity, gpu_memory, legacy, env) -> dict[str, Any]:
    from lmkit.analysis import memory as mem
    from lmkit.models import build_model

    config = _run_config(preset, overrides, batch_size, fp16, bf16, fp32, grad_checkpointing)
    model_cfg = config.model.model_copy()
    model_cfg.vocab_size = mem.resolve_vocab_size(config)

    model = build_model(model_cfg, device="meta")
    seen: set[int] = set()
    params = [p for p in model.parameters() if not (id(p) in seen or seen.add(id(p)))]
    total = model.num_params()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    # the token (and position) tables; an untied output head apart, a tied one is the token table
    head = 0 if model.tied_embeddings else sum(p.numel() for p in model.output_head().parameters())
    embeddings = total - model.num_params(exclude_embeddings=True)
    out: dict[str, Any] = {
        "preset": {"name": config.preset, "description": config.description, "n_layer": model_cfg.n_layer,
                   "n_head": model_cfg.n_head, "n_embd": model_cfg.n_embd, "d_ff": model_cfg.ff_dim,
                   "block_size": model_cfg.block_size, "vocab_size": model_cfg.vocab_size,
                   "dropout": model_cfg.dropout, "tie_embeddings": model_cfg.tie_embeddings},
        "params": {"total": total, "trainable": trainable, "embeddings": embeddings, "head": head,
                   "non_embedding": total - embeddings - head, "target": config.target_params,
                   "target_diff_pct": (100.0 * (total - config.target_params) / config.target_params
                                       if config.target_params else None),
                   "target_approximate": (target_is_approximate(config.target_params)
                                          if config.target_params else None)},
    }
    tcfg = config.training
    kw = {"seq_len": seq_len, "precision": tcfg.precision, "attention": attention,
          "grad_checkpointing": tcfg.grad_checkpointing, "grad_accum_steps": tcfg.grad_accum_steps, "device": "cuda",
          "optimizer": tcfg.optimizer}
    est = mem.estimate_memory(model_cfg, tcfg.batch_size, **kw)
    out["memory"] = est.to_dict()

    cards: list[dict[str, Any]] = []
    for gpu in env.gpus:
        if gpu.total_bytes:
            cards.append({"gpu": f"cuda:{gpu.index} {gpu.name}", "capacity_bytes": gpu.total_bytes,
                          "free_bytes": gpu.free_bytes, "bf16": gpu.bf16 is not False})
    if capacity is not None:
        cards.append({"gpu": f"--gpu-memory {gpu_memory}", "capacity_bytes": capacity, "free_bytes": None,
                      "bf16": True})
    kw_fit = {k: v for k, v in kw.items() if k != "grad_accum_steps"}
    for card in cards:
        card["verdict"] = mem.verdict(est.total, card["capacity_bytes"])
        card["max_batch_size"] = mem.max_batch_size(model_cfg, card["capacity_bytes"], **kw_fit)
        card["free_note"] = (card["free_bytes"] is not None and est.total > card["free_bytes"]
                             and card["verdict"] != "does not fit")
        if card["verdict"] != "fits":
            card["suggestions"] = [
                {"try": s.text, "flags": s.flags, "total_bytes": s.total_bytes,
                 "verdict": mem.verdict(s.total_bytes, card["capacity_bytes"])}
                for s in mem.suggestions(model_cfg, est, card["capacity_bytes"], bf16_supported=card["bf16"])
            ]
    out["verdicts"] = cards
    if config.training.gpu_only and not env.cuda_available:
        out["warning"] = (f"preset {config.preset} is GPU-only: `lmkit train` exits 3 on this machine "
                          f"({env.cuda_note})")
    if legacy:
        seed = [mem.legacy_seed001(total, b, est.seq_len, model_cfg.n_embd, model_cfg.n_head, model_cfg.n_layer)
                for b in (tcfg.batch_size, 8, 16, 32)]
        out["legacy_seed001"] = {"this_batch": seed[0].__dict__, "seed_batches": [s.__dict__ for s in seed[1:]]}
    return out


def _parallel_report(preset, overrides, batch_size, seq_len, fp16, bf16, fp32, grad_checkpointing, attention,
                     nproc, parallelism, report, env) -> dict[str, Any]:
    """``--nproc N``: one GPU's memory with N processes (:mod:`lmkit.analysis.memory_parallel`) and a verdict
    for each card of the single-process verdicts (this machine's GPUs, ``--gpu-memory``)."""
    from lmkit.analysis import memory as mem
    from lmkit.analysis.memory_parallel import estimate_parallel_memory, group_shapes
    from lmkit.models import build_model

    config = _run_config(preset, overrides, batch_size, fp16, bf16, fp32, grad_checkpointing)
    tcfg = config.training
    kind = parallelism or tcfg.parallelism or "ddp"
    model_cfg = config.model.model_copy()
    model_cfg.vocab_size = mem.resolve_vocab_size(config)
    shapes: dict[str, Any] = {}
    if kind == "fsdp":
        block, root = group_shapes(build_model(model_cfg, device="meta"))
        shapes = {"block_shapes": block, "root_shapes": root}
    est = estimate_parallel_memory(model_cfg, tcfg.batch_size, nproc=nproc, parallelism=kind, seq_len=seq_len,
                                   precision=tcfg.precision, attention=attention,
                                   grad_checkpointing=tcfg.grad_checkpointing, grad_accum_steps=tcfg.grad_accum_steps,
                                   device="cuda", optimizer=tcfg.optimizer, **shapes)
    out = est.to_dict()
    out["global_batch"] = tcfg.batch_size * tcfg.grad_accum_steps * nproc
    out["verdicts"] = [{"gpu": card["gpu"], "capacity_bytes": card["capacity_bytes"],
                        "verdict": mem.verdict(est.total, card["capacity_bytes"])} for card in report["verdicts"]]
    visible = sum(1 for g in env.gpus if g.total_bytes)
    if not report["verdicts"]:
        out["note"] = (f"an estimate for {nproc} GPU(s) (none visible here): add --gpu-memory SIZE (e.g. 80GiB) "
                       "to judge a card")
    elif visible and nproc > visible:
        out["note"] = (f"{nproc} processes need {nproc} GPUs; this machine shows {visible} "
                       "(several machines: torchrun --nnodes)")
    return out


def _cpu_load_rows(load) -> list[tuple[str, str]]:
    """The Environment table's rows for a :class:`~lmkit.analysis.environment.CpuLoad`."""
    if load is None:
        return []
    avg = ", ".join(f"{x:.2f}" for x in load.load_avg) + " (1, 5, 15 min)" if load.load_avg else "-"
    top = ", ".join(f"{p.name} (pid {p.pid}) {p.cpu_percent:.0f}%" for p in load.top)
    other = (f"~{load.other_busy_cores:.1f} of {load.usable_cores} usable cores busy "
             f"({load.sample_s:.1f} s sample){': ' + top if top else ''}")
    return [("load average", avg), ("other processes' CPU", other)]


def _rows_table(title: str, rows: list[dict[str, Any]]):
    """A memory estimate's rows as a Rich table (component, size, at peak, formula), a section
    opened below them for the totals."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left")
    table.add_column("component")
    table.add_column("size", justify="right")
    table.add_column("at peak", justify="right")
    table.add_column("formula / source")
    for row in rows:
        table.add_row(Text(row["name"]), _gib(row["size_bytes"]), _gib(row["at_peak_bytes"]), Text(row["formula"]))
    table.add_section()
    return table


def _render(report: dict[str, Any], env) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()  # dynamic text (names, paths, messages) goes through Text() or escape()
    table = Table(title="Environment", show_header=False, title_justify="left")
    table.add_column("item", style="bold")
    table.add_column("value")
    rows = [
        ("python", env.python), ("platform", env.platform), ("lmkit", env.lmkit), ("torch", env.torch),
        ("CUDA (torch build)", env.cuda or "none"), ("cuDNN", env.cudnn or "none"),
        ("NVIDIA driver (NVML)", env.driver or f"none ({env.nvml_error or 'NVML unavailable'})"),
        ("CUDA available", "yes" if env.cuda_available else f"no: {env.cuda_note}"),
        ("Apple MPS", "available" if env.mps_available else ("built, not available" if env.mps_built else "no")),
        ("CPUs", f"{env.cpu_count} ({env.cpu_usable} usable, torch uses {env.torch_threads} threads)"),
        *_cpu_load_rows(env.cpu_load),
        ("RAM", f"{_gib(env.ram_total_bytes)} ({_gib(env.ram_available_bytes)} available)"),
    ]
    for key, value in rows:
        table.add_row(key, Text(str(value)))  # process names, paths: shown as written, not read as markup
    console.print(table)
    if env.cpu_load is not None and env.cpu_load.warning:
        console.print(f"[yellow]warning:[/yellow] {escape(env.cpu_load.warning)}", highlight=False)
    if env.gpus:
        gt = Table(title="GPUs", title_justify="left")
        for col in ("index", "name", "capability", "total", "free", "bf16", "TF32", "usable by torch"):
            gt.add_column(col)
        for g in env.gpus:
            gt.add_row(str(g.index), Text(g.name), g.capability or "-", _gib(g.total_bytes), _gib(g.free_bytes),
                       _yes(g.bf16), _yes(g.tf32), _yes(g.usable_by_torch))
        console.print(gt)
    else:
        console.print("GPUs: none visible")

    if "params" not in report:
        return
    p, m, info = report["params"], report["memory"], report["preset"]
    console.print()
    pt = Table(title=Text(f"Model: {info['name']}"), show_header=False, title_justify="left")
    pt.add_column("item", style="bold")
    pt.add_column("value", justify="right")
    pt.add_row("shape", f"n_layer {info['n_layer']}, n_head {info['n_head']}, n_embd {info['n_embd']}, "
               f"d_ff {info['d_ff']}, block_size {info['block_size']}, vocab {info['vocab_size']:,}")
    pt.add_row("total parameters", f"{p['total']:,} ({p['total'] / 1e6:.2f}M)")
    pt.add_row("trainable", f"{p['trainable']:,}")
    pt.add_row("embeddings (token + position)", f"{p['embeddings']:,}")
    if p["head"]:
        pt.add_row("untied lm_head", f"{p['head']:,}")
    pt.add_row("non-embedding", f"{p['non_embedding']:,}")
    console.print(pt)
    console.print(f"Total parameters: {p['total']:,} ({p['total'] / 1e6:.2f}M)")
    if p["target"] and target_is_approximate(p["target"]):
        console.print(f"Difference from {_target_label(p['target'])} target: {p['target_diff_pct']:.1f}%")
    elif p["target"] and p["target"] != p["total"]:  # an override changed the preset's documented shape
        console.print(f"The preset documents {p['target']:,} parameters; this configuration has "
                      f"{p['total'] - p['target']:+,} ({p['target_diff_pct']:+.1f}%)", highlight=False)
    if report.get("warning"):
        console.print(f"[yellow]warning:[/yellow] {escape(report['warning'])}")

    kernel = "fused SDPA" if m["attention"] == "sdpa" else "eager (math) attention"
    prec = "fp32" if m["precision"] == "fp32" else f"{m['precision']} autocast"
    mt = _rows_table(f"Memory of one training step: B={m['batch_size']}, T={m['seq_len']}, {prec}, "
                     f"{_optimizer_label(m.get('optimizer', 'adamw'))}, {kernel}, "
                     f"gradient checkpointing {'on' if m['grad_checkpointing'] else 'off'}", m["rows"])
    mt.add_row("peak allocated", "", _gib(m["peak_allocated"]), f"torch.cuda.max_memory_allocated; at {m['peak_phase']}")
    mt.add_row("framework overhead", "", _gib(m["overhead"]),
               f"CUDA context {_gib(m['overhead_detail']['cuda_context'])} + allocator slack "
               f"{_gib(m['overhead_detail']['allocator_slack'])}")
    mt.add_row("[bold]total[/bold]", "", f"[bold]{_gib(m['total'])}[/bold]", "what the card must hold")
    console.print(mt)

    if "legacy_seed001" in report:
        leg = report["legacy_seed001"]["this_batch"]
        lt = Table(title=(f"The WikiText GPT guide's hand table (--legacy-hand-table): B={leg['batch_size']}, fp32, "
                          "GB = 10⁹ bytes"),
                   title_justify="left")
        lt.add_column("component")
        lt.add_column("memory", justify="right")
        for name, key in (("Model parameters", "params_gb"), ("Gradients", "grads_gb"),
                          ("Optimizer (AdamW)", "adam_gb"), (f"Activations ({info['n_layer']} layers)", "activations_gb"),
                          ("  of which attention scores", "attention_scores_gb"), ("Overhead", "overhead_gb")):
            lt.add_row(name, f"{leg[key]:.2f} GB")
        lt.add_row("[bold]TOTAL[/bold]", f"[bold]{leg['total_gb']:.2f} GB[/bold]")
        console.print(lt)
        seeds = report["legacy_seed001"]["seed_batches"]
        console.print("the guide's formula at B = 8 / 16 / 32: " + " / ".join(f"{s['total_gb']:.2f}" for s in seeds)
                      + " GB; lmkit's estimate at B=" + f"{m['batch_size']}: {m['total'] / 1e9:.2f} GB")

    if not report["verdicts"]:
        console.print("No GPU visible: add --gpu-memory 16GiB to ask about a card you do not have.")
        _render_parallel(console, report)
        return
    vt = Table(title="Verdict", title_justify="left")
    for col in ("GPU", "memory", "estimate", "verdict", "largest batch that fits"):
        vt.add_column(col)
    colour = {"fits": "green", "tight": "yellow", "does not fit": "red"}
    for card in report["verdicts"]:
        v = card["verdict"]
        note = " (more than is free now)" if card["free_note"] else ""
        vt.add_row(Text(card["gpu"]), _gib(card["capacity_bytes"]), _gib(m["total"]), f"[{colour[v]}]{v}[/]{note}",
                   str(card["max_batch_size"]) if card["max_batch_size"] else "none (B=1 does not fit)")
    console.print(vt)
    for card in report["verdicts"]:
        if not card.get("suggestions"):
            continue
        st = Table(title=f"What to try on {card['gpu']}", title_justify="left")
        for col in ("try", "estimate", "verdict", "flags"):
            st.add_column(col)
        for s in card["suggestions"]:
            st.add_row(Text(s["try"]), _gib(s["total_bytes"]), f"[{colour[s['verdict']]}]{s['verdict']}[/]",
                       Text(s["flags"]))
        console.print(st)
    _render_parallel(console, report)


def _render_parallel(console, report: dict[str, Any]) -> None:
    """The ``--nproc`` tables: one GPU's memory with N processes, part by part, and its verdicts."""
    from rich.table import Table

    par = report.get("parallel")
    if par is None:
        return
    kind = par["parallelism"].upper()
    prec = "fp32" if par["precision"] == "fp32" else f"{par['precision']} autocast"
    pt = _rows_table(f"Memory per GPU with {par['nproc']} processes ({kind}): B={par['batch_size']} per process "
                     f"(global batch {par['global_batch']} sequences), T={par['seq_len']}, {prec}", par["rows"])
    pt.add_row("peak allocated", "", _gib(par["peak_allocated"]), f"per GPU; at {par['peak_phase']}")
    pt.add_row("framework overhead", "", _gib(par["overhead"]), "CUDA context + allocator slack (NCCL buffers not counted)")
    pt.add_row("[bold]total per GPU[/bold]", "", f"[bold]{_gib(par['total'])}[/bold]",
               f"one process alone: {_gib(par['single_process_total'])}")
    console.print(pt)
    colour = {"fits": "green", "tight": "yellow", "does not fit": "red"}
    if par["verdicts"]:
        vt = Table(title=f"Verdict per GPU with {par['nproc']} processes ({kind})", title_justify="left")
        for col in ("GPU", "memory", "estimate per GPU", "verdict"):
            vt.add_column(col)
        for card in par["verdicts"]:
            v = card["verdict"]
            vt.add_row(Text(card["gpu"]), _gib(card["capacity_bytes"]), _gib(par["total"]), f"[{colour[v]}]{v}[/]")
        console.print(vt)
    if par.get("note"):
        console.print(Text(par["note"]), highlight=False)
