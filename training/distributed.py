"""Multi-host start-up: connect this process to the others through JAX's distributed runtime.

Every process of a multi-host job runs the same `train.py` command; `initialize` must run before
the first JAX computation. The processes find each other in one of two ways:

  explicit flags   --coordinator_address=HOST:PORT --num_processes=N --process_id=I, where HOST
                   is the machine of process 0, which starts the coordinator service on PORT
  the cluster      SLURM (srun with one task per host or per GPU) and Cloud TPU pods set
                   variables from which `jax.distributed.initialize()` derives all three

Without either, the run stays single-process.
"""

import os
import sys
import threading
import time

import jax
from absl import logging

# Variables that `jax.distributed.initialize()` reads on a SLURM job step (jax 0.10,
# jax/_src/clusters/slurm_cluster.py).
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                   "SLURM_LOCALID")
# Variables of a Cloud TPU VM that list the hosts of the slice (jax/_src/clusters/
# cloud_tpu_cluster.py); a comma-separated list means several hosts.
TPU_HOST_VARIABLES = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
# Extra seconds that JAX's own deadline waits beyond ours, so that our message comes first:
# when JAX's deadline passes, the runtime aborts the process with a C++ stack trace.
JAX_DEADLINE_MARGIN_S = 30


def detect_cluster() -> str | None:
    """Return "slurm" or "tpu" when this process runs in a multi-process job of that kind."""
    if all(name in os.environ for name in SLURM_VARIABLES):
        if int(os.environ["SLURM_NTASKS"]) > 1:
            return "slurm"
    for name in TPU_HOST_VARIABLES:
        if "," in os.environ.get(name, ""):
            return "tpu"
    return None


def validate_process_flags(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None, timeout_s: int) -> None:
    """Raise ValueError naming the flag for an incomplete or inconsistent set of process flags."""
    process_flags = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    missing = [f"--{name}" for name, value in process_flags.items() if value is None]
    if 0 < len(missing) < len(process_flags):
        raise ValueError(f"missing {', '.join(missing)}: a multi-process run needs all of "
                         "--coordinator_address, --num_processes and --process_id")
    if timeout_s < 1:
        raise ValueError(f"invalid --initialization_timeout={timeout_s}; allowed: an integer "
                         ">= 1 (seconds)")
    if missing:
        return

    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid --coordinator_address={coordinator_address!r}; allowed: "
                         "HOST:PORT with a port from 1 to 65535, HOST being the machine of "
                         "process 0")
    if num_processes < 1:
        raise ValueError(f"invalid --num_processes={num_processes}; allowed: an integer >= 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"invalid --process_id={process_id} for --num_processes="
                         f"{num_processes}; allowed: 0 to {num_processes - 1}, a different id "
                         "for each process")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300) -> bool:
    """Join the processes of a multi-host job; return whether this run is multi-process.

    Uses the explicit arguments when given, else the cluster's variables (`detect_cluster`).
    If the other processes have not all connected within `timeout_s` seconds, write a message
    that names the coordinator and the process counts to stderr and exit with status 1.
    """
    validate_process_flags(coordinator_address, num_processes, process_id, timeout_s)
    cluster = detect_cluster()
    if coordinator_address is None and cluster is None:
        return False
    if coordinator_address is not None and num_processes == 1:
        return False

    # Cross-process collectives of CPU devices (the tests on one machine) go through Gloo. Gloo
    # is the default in jax 0.10, and setting it here keeps CPU runs working if that changes.
    # The setting does not affect GPU or TPU devices.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

    if coordinator_address is not None:
        where = (f"process {process_id} of {num_processes}, coordinator "
                 f"{coordinator_address}")
    else:
        where = f"{cluster} cluster, coordinator and process ids from its variables"
    logging.info("joining the distributed runtime (%s), waiting up to %d s", where, timeout_s)

    watchdog = threading.Timer(timeout_s, _exit_timed_out, args=(where, timeout_s))
    watchdog.daemon = True
    watchdog.start()
    start = time.perf_counter()
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=timeout_s + JAX_DEADLINE_MARGIN_S)
    finally:
        watchdog.cancel()
    logging.info("joined as process %d of %d in %.1f s; %d local and %d global devices",
                 jax.process_index(), jax.process_count(), time.perf_counter() - start,
                 jax.local_device_count(), jax.device_count())
    return True


def _exit_timed_out(where: str, timeout_s: int) -> None:
    # Runs on the watchdog thread while jax.distributed.initialize blocks in C++, which cannot
    # be interrupted from Python, so the process ends here with os._exit.
    sys.stderr.write(
        f"train.py: timed out after {timeout_s} s joining the distributed runtime ({where}). "
        "Check that the coordinator address is the reachable HOST:PORT of process 0, that "
        "every process was started with the same --num_processes and its own --process_id, "
        "or raise --initialization_timeout.\n")
    sys.stderr.flush()
    os._exit(1)
