"""The server the CPU's slot processes fork from (multiprocessing's forkserver), which imports torch, transformers
and peft once; light to import itself, so that `mua sweep` starts it before it imports anything heavy."""

from __future__ import annotations

# What a CPU slot process imports before it can train: its processes fork from a server that imported these once
# (multiprocessing's forkserver) instead of each starting Python and importing torch, transformers and peft again
# (benchmarks/first_run.py --parts workers).
SLOT_IMPORTS = ["mua_cli.quiet_libraries", "mua_cli.sweep.pool", "mua_cli.sweep.trainer"]


def process_context(device: str):
    """CPU slot processes: forkserver where the platform has it. GPU ones: spawn, as a process forked from one that
    has asked CUDA anything cannot use it."""
    import torch.multiprocessing as mp

    if device != "cpu" or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(SLOT_IMPORTS)
    return ctx


def start_process_server() -> None:
    """Starts the CPU slot processes' server now, without importing torch here: it imports on the core that idles
    while this process imports, and a sweep's first slot process then starts at once. Unused (a GPU, one slot), it waits
    idle and ends with this process."""
    import multiprocessing as mp

    if "forkserver" in mp.get_all_start_methods():
        from multiprocessing import forkserver

        forkserver.set_forkserver_preload(SLOT_IMPORTS)
        forkserver.ensure_running()
