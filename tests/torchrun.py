"""Run an entry point as a GPU user runs it, with N processes on the CPU, for the multi-process tests:

    ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node N -m <module> <args>

(``accelerate launch --cpu`` starts one process only.) The timeout is a hang guard, not a speed
check (~1 min alone, several beside other jobs). When it fires, every rank is sent SIGABRT with
Python's fault handler on, so the failure shows where each thread of each rank was stuck instead
of a bare ``TimeoutExpired``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 600


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            children = [int(c) for t in os.listdir(f"/proc/{p}/task")
                        for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
        except OSError:  # gone meanwhile
            continue
        found += children
        todo += children
    return found


def torchrun(module: str, argv: list[str], processes: int = 2, env: dict | None = None,
             timeout: float = HANG_GUARD_S) -> subprocess.CompletedProcess:
    """Launch ``module`` under torchrun with ``processes`` CPU processes; the completed process
    (stdout, stderr as text). ``env`` is added to a copy of this environment without torchrun's own
    rank variables."""
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    run_env.update(ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    run_env.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", module, *map(str, argv)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in _descendants(proc.pid):  # the ranks: each dumps its threads' Python stacks, then dies
            try:
                os.kill(pid, signal.SIGABRT)
                time.sleep(1)  # one rank's dump at a time
            except ProcessLookupError:
                pass
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        raise AssertionError(f"torchrun -m {module} hung for {timeout:.0f}s; the ranks' stacks when stopped:\n"
                             f"{err[-12000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
