"""Multi-process (multi-controller) JAX, as on a GPU/TPU pod.

:func:`initialize` calls ``jax.distributed.initialize`` from explicit arguments or, when none are given, from the
environment JAX understands (``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, or the
cluster detection of SLURM, Open MPI, Cloud TPU, ...). On CPU it switches cross-process collectives to gloo,
so ``all_to_all`` and ``psum`` span processes (how pod jobs are tested on one machine: 2 processes x 4
devices). Call it before anything touches a JAX device.
"""

from __future__ import annotations

import os


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               local_device_count: int | None = None) -> bool:
    """Join a multi-process job. Returns ``False`` (and does nothing) when no job is configured."""
    import jax

    explicit = coordinator is not None or num_processes is not None or process_id is not None
    from_env = any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"))
    if not explicit and not from_env:
        return False
    if explicit and (coordinator is None or num_processes is None or process_id is None):
        raise ValueError("multi-process: give all of coordinator address, number of processes and process id")
    if explicit and not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} must be in [0, {num_processes})")
    if local_device_count is not None:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={local_device_count}".strip()
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms in ("", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    else:
        jax.distributed.initialize()
    return True
