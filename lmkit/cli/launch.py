"""``lmkit train|resume --nproc-per-node N``: PyTorch's elastic launcher, started in-process.

The launcher is ``torch.distributed.run``'s own engine
(:func:`torch.distributed.launcher.api.elastic_launch` with a ``LaunchConfig``: a standalone
c10d rendezvous on a free localhost port, one node, ``N`` workers), whose workers run the same
``lmkit`` command line without ``--nproc-per-node`` / ``--max-restarts`` -- so the workers are
exactly what ``torchrun --standalone --nproc-per-node N -m lmkit ...`` starts.

What lmkit adds around it:

* **The run folder is fixed before the workers start.** The launcher claims it
  (:meth:`~lmkit.rundir.RunDir.claim`; for ``resume``, locks the existing one), holds its lock
  for the whole job and names it to the workers (:data:`~lmkit.rundir.RUN_DIR_ENV`,
  :data:`~lmkit.rundir.LOCK_PID_ENV`). A worker whose folder already holds a checkpoint --
  after a restart, ``TORCHELASTIC_RESTART_COUNT > 0`` -- resumes from the newest complete one;
  otherwise it starts the run in that folder. A restarted worker therefore continues the same
  run, never claims a new one.
* **A stop is not a failure to retry.** torch's agent restarts the worker group on any
  non-zero exit while restarts are left (``SimpleElasticAgent._invoke_run``); lmkit's agent
  (a :class:`~torch.distributed.elastic.agent.server.local_elastic_agent.LocalElasticAgent`
  whose ``_monitor_workers`` reads the failures' exit codes) spends no restart when a worker
  exited 130/143 (SIGINT/SIGTERM: a requested stop, checkpoint written), 2 (bad input: the
  same input fails the same way) or 3 (the machine cannot do it: no CUDA for ``--gpu-only``, out
  of memory). Every other failure (a crash, a killed worker) restarts the
  group while ``--max-restarts`` allows.
* **Signals.** SIGTERM/SIGINT to the launcher (SLURM's preemption or time limit, Ctrl-C) reach
  the workers through the agent (it forwards the signal to each worker's process group and
  waits ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds, here 120 by default, before SIGKILL); they
  agree on the step, write one checkpoint and exit 143/130, and so does the launcher.
* **Exit codes:** 0; a stop's 130/143; a worker's own code (2, 3, 1); ``128 + N`` for a worker
  killed by signal N with no restart left.

Source: ``torch/distributed/run.py`` (standalone rendezvous), ``launcher/api.py``
(``LaunchConfig``, ``launch_agent``), ``elastic/agent/server/api.py`` (restart policy).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, TextIO

from lmkit.errors import ConfigError
from lmkit.rundir import LOCK_PID_ENV, RUN_DIR_ENV, RunDir

#: Exit codes of a requested stop: never restarted.
STOP_CODES = frozenset({130, 143})
#: Exit codes no restart can fix: a stop, bad input (ConfigError/DataError/CheckpointError, 2), or
#: a machine that cannot do what was asked (DeviceError, 3: ``--gpu-only`` without CUDA, out of
#: memory -- the same workers on the same GPUs fail the same way).
NO_RESTART_CODES = STOP_CODES | {2, 3}
#: Seconds the agent waits for workers to checkpoint after forwarding a signal (then SIGKILL).
SHUTDOWN_TIMEOUT_S = 120
#: Test hook: ``RANK:ATTEMPT:MICRO:SIGNAME`` (``RANK`` may be ``*``) becomes ``LMKIT_TEST_SIGNAL``
#: (``MICRO:SIGNAME``, see :class:`lmkit.training.loop.Trainer`) in that worker of that attempt only.
TEST_HOOK_ENV = "LMKIT_TEST_LAUNCH_SIGNAL"
#: The signals torch's agent handles (``LaunchConfig.signals_to_handle``): forwarded to the workers.
_AGENT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
#: torch's opt-out of sharing the agent's rendezvous store with the workers (see :func:`launch`).
SHARE_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


# ---------------------------------------------------------------------------------- checks


def check_options(nproc: int | None, max_restarts: int | None) -> bool:
    """Whether to launch; refuse impossible launch options in one line.

    Raises:
        ConfigError: ``--nproc-per-node < 1``, ``--max-restarts`` without it or negative, or
            already inside a launcher (``WORLD_SIZE`` set: torchrun or lmkit's own).
    """
    if nproc is None:
        if max_restarts:
            raise ConfigError("--max-restarts needs --nproc-per-node N (restarts are the launcher's)")
        return False
    if nproc < 1:
        raise ConfigError(f"--nproc-per-node {nproc}: needs at least 1 process")
    if max_restarts is not None and max_restarts < 0:
        raise ConfigError(f"--max-restarts {max_restarts}: needs 0 or more")
    if os.environ.get("WORLD_SIZE"):
        raise ConfigError(f"--nproc-per-node: already inside a launcher (WORLD_SIZE={os.environ['WORLD_SIZE']}); "
                          "drop --nproc-per-node under torchrun")
    return True


def check_devices(nproc: int, device: str | None) -> None:
    """Refuse more processes than CUDA devices when the run trains on CUDA.

    Raises:
        ConfigError: ``nproc > 1``, the device is ``cuda`` (or ``auto`` with CUDA present)
            and fewer than ``nproc`` GPUs are visible.
    """
    if nproc <= 1:
        return
    device = (device or "auto").lower()
    if not (device.startswith("cuda") or device == "auto"):
        return
    import torch

    if device == "auto" and not torch.cuda.is_available():
        return
    count = torch.cuda.device_count()
    if count < nproc:
        hint = f"use --nproc-per-node {count} (or --device cpu)" if count else "use --device cpu"
        raise ConfigError(f"--nproc-per-node {nproc} with --device {device}: only {count} GPU(s) visible; {hint}")


# ---------------------------------------------------------------------------------- launcher


def worker_command(ctx: Any) -> list[str]:
    """The workers' ``python`` arguments: ``-m lmkit COMMAND`` and the options given to this
    process, read back from the parser's context ``ctx`` (a ``typer.Context``; so a call from
    Python -- typer's test runner -- gets the same command), without the launch options."""
    from lmkit.cli import _common

    positional: list[str] = []
    root, options = (["--debug"] if _common.DEBUG else []), []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if param.name in ("nproc_per_node", "max_restarts") or getattr(source, "name", "") not in (
                "COMMANDLINE", "ENVIRONMENT"):
            continue
        value = ctx.params[param.name]
        if param.param_type_name == "argument":
            positional += [str(v) for v in (value if param.nargs != 1 else [value])]
        elif getattr(param, "is_flag", False) and not param.secondary_opts:
            options += [param.opts[0]] if value else []
        elif getattr(param, "is_flag", False):
            options.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            for item in value if param.multiple else [value]:
                options += [param.opts[0], str(item)]
    return ["-u", "-m", "lmkit", *root, ctx.info_name, *positional, *options]


def _agent_class() -> type:
    """torch's local agent, with the stop rule: no restart after a stop or bad input."""
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    class StopAwareAgent(LocalElasticAgent):
        out: TextIO = sys.stderr

        def _monitor_workers(self, worker_group: Any) -> Any:
            result = super()._monitor_workers(worker_group)
            if result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY) and self._remaining_restarts > 0:
                codes = {f.exitcode for f in result.failures.values()}
                if codes & NO_RESTART_CODES:
                    self._remaining_restarts = 0  # the agent then stops the others and reports the failure
                else:
                    left = self._remaining_restarts
                    self.out.write(f"launch: {_describe(result.failures)}; restarting the workers "
                                   f"({left} restart{'s' if left != 1 else ''} left): they resume the run from its "
                                   "newest complete checkpoint (without one, start it again)\n")
                    self.out.flush()
            return result

    return StopAwareAgent


def _describe(failures: dict[int, Any]) -> str:
    parts = []
    for rank, failure in sorted(failures.items()):
        code = failure.exitcode
        how = f"killed by {_signame(-code)}" if code < 0 else f"exit {code}"
        parts.append(f"rank {rank} (pid {failure.pid}) {how}")
    return "worker " + ", ".join(parts)


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def launch(run: RunDir, ctx: Any, nproc: int, max_restarts: int, *, new: bool, out: TextIO) -> int:
    """Run ``nproc`` workers of this command line on ``run`` under torch's elastic agent and
    return the exit code for the launcher.

    Args:
        run: the run folder, claimed (``new``) or locked (a resume) by this process.
        ctx: the command's ``typer.Context`` (the workers get its command line).
        new: a new run: a folder no worker ever wrote to is released again at the end.
        out: where the launcher's own lines go.
    """
    import torch.distributed.launcher.api as launcher_api
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    saved = {var: os.environ.get(var) for var in (RUN_DIR_ENV, LOCK_PID_ENV, SHARE_STORE_ENV, "OMP_NUM_THREADS",
                                                  "TORCHELASTIC_SIGNALS_TO_HANDLE")}
    handlers = {sig: signal.getsignal(sig) for sig in _AGENT_SIGNALS}  # the agent installs its own, for good
    original = launcher_api.LocalElasticAgent
    try:
        args = worker_command(ctx)
        os.environ[RUN_DIR_ENV] = str(run.path.resolve())
        os.environ[LOCK_PID_ENV] = str(os.getpid())
        # torch 2.13's agent shares its rendezvous TCPStore with the workers across restarts, and
        # a restarted gloo group can read the dead attempt's addresses (connectFullMesh: connection
        # refused; plain torchrun --max-restarts does the same). torch's own opt-out gives every
        # attempt a fresh store, hosted by its rank 0.
        os.environ.setdefault(SHARE_STORE_ENV, "1")
        threads_note = ""
        if nproc > 1 and not any(os.environ.get(v) for v in ("OMP_NUM_THREADS", "LMKIT_THREADS")) \
                and "--threads" not in args:
            from lmkit.threads import usable_cores

            share = max(1, usable_cores() // nproc)
            os.environ["OMP_NUM_THREADS"] = str(share)  # as torchrun does (it sets 1): a share of the cores
            threads_note = f", {share} CPU thread(s) each"
        restarts = (f"up to {max_restarts} restart{'s' if max_restarts != 1 else ''} resuming from the newest "
                    "complete checkpoint") if max_restarts else "no restarts"
        out.write(f"launch: {nproc} worker process{'es' if nproc != 1 else ''} on this node (torch elastic, "
                  f"standalone rendezvous on localhost{threads_note}), {restarts}; run folder {run.path.resolve()}\n")
        out.flush()
        config = launcher_api.LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), role="lmkit",
            rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=max_restarts,
            shutdown_timeout=int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT_S)),
        )
        agent = _agent_class()
        agent.out = out
        launcher_api.LocalElasticAgent = agent  # launch_agent builds its agent by this name
        launcher_api.elastic_launch(config, sys.executable)(*args)
        code = 0
    except SignalException as exc:
        code = 128 + int(exc.sigval)
        out.write(f"launch: stopped by {_signame(int(exc.sigval))}; workers signalled; "
                  f"resume with: lmkit resume {run.path} --nproc-per-node {nproc}\n")
    except ChildFailedError as exc:
        code = _exit_code(exc.failures, run, nproc, out)
    finally:
        launcher_api.LocalElasticAgent = original
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        if new and not _started(run):
            run.release()  # set-up failed before anything was written: leave no folder behind
        run.unlock()
    out.flush()
    return code


def _exit_code(failures: dict[int, Any], run: RunDir, nproc: int, out: TextIO) -> int:
    """The launcher's exit code for failed workers (their own lines are already printed)."""
    codes = [f.exitcode for _, f in sorted(failures.items())]
    stops = [c for c in codes if c in STOP_CODES]
    if stops:
        return 143 if 143 in stops else stops[0]
    first = min(failures.values(), key=lambda f: f.timestamp)
    if first.exitcode in (2, 3):  # bad input / the machine cannot: the worker said why in one line
        return first.exitcode
    out.write(f"error: {_describe(failures)}; no restart left (--max-restarts); "
              f"resume with: lmkit resume {run.path} --nproc-per-node {nproc}\n")
    return 128 - first.exitcode if first.exitcode < 0 else first.exitcode


def _started(run: RunDir) -> bool:
    return run.events_path.exists() or run.metrics_path.exists() or (
        run.checkpoints.is_dir() and any(run.checkpoints.iterdir()))


# ---------------------------------------------------------------------------------- workers


def launched_run_dir() -> Path | None:
    """In a worker of lmkit's launcher: the run folder it claimed (and applies the test hook);
    ``None`` elsewhere (torchrun's workers claim their own folder)."""
    folder = os.environ.get(RUN_DIR_ENV)
    if not folder or not os.environ.get(LOCK_PID_ENV):
        return None
    hook = os.environ.get(TEST_HOOK_ENV)
    if hook:
        rank, attempt, micro, name = hook.split(":")
        mine = rank in ("*", os.environ.get("RANK")) and attempt == os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if mine:
            os.environ["LMKIT_TEST_SIGNAL"] = f"{micro}:{name}"
        else:
            os.environ.pop("LMKIT_TEST_SIGNAL", None)
    return Path(folder)


def restart_count() -> int:
    """``TORCHELASTIC_RESTART_COUNT`` (0 outside a restart)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def holds_checkpoint(run_dir: Path) -> bool:
    """Whether the folder holds a checkpoint to resume from (a temporary file left by a torn
    save does not count; which one is complete is the resume's choice)."""
    folder = RunDir(run_dir).checkpoints
    return folder.is_dir() and any(not p.name.startswith(".") and p.name != "superseded" for p in folder.iterdir())


__all__ = ["NO_RESTART_CODES", "STOP_CODES", "check_devices", "check_options", "holds_checkpoint", "launch",
           "launched_run_dir", "restart_count", "worker_command"]
