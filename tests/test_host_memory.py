"""training/host_memory.py: with the setting, XLA:CPU's large buffers stop page-faulting every call.

Each case runs in a fresh process, because the setting must come before JAX starts its backend.
The property checked is the kernel's count of minor page faults (`ru_minflt`) during calls that
write a new 64 MiB array. With glibc's defaults every call maps fresh pages and faults on each
of them. With the setting, the memory freed by earlier calls is reused and the faults stop.
That takes some calls: glibc's heap first grows by a few 64 MiB buffers, until the freed ones
leave holes large enough for the next buffer.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from training import host_memory

REPO = Path(__file__).resolve().parents[1]
PAGES = 64 * 2**20 // 4096

# Prints whether the setting took effect, then the minor page faults of each of the last 10 of 40
# calls that return a new 64 MiB array.
SCRIPT = """
import resource, sys
from absl import flags
from training import host_memory
mode = sys.argv[1]
if mode == "function":
    assert host_memory.keep_freed_host_memory()
else:
    flags.FLAGS(["prog"] + sys.argv[2:])
    host_memory.apply_flag()
import jax, jax.numpy as jnp
x = jnp.ones((64 * 2**20 // 4,), jnp.float32)
double = jax.jit(lambda x: x * 2.0)
faults = []
for _ in range(40):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = double(x).block_until_ready()
    assert float(y[-1]) == 2.0
    del y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(host_memory.is_kept(), " ".join(str(count) for count in faults[-10:]))
"""

pytestmark = pytest.mark.skipif(host_memory._glibc() is None, reason="needs Linux with glibc")


def _run_and_count_faults(*args: str) -> tuple[bool, list[int]]:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"),
        capture_output=True, text=True, timeout=120, check=True)
    applied, *faults = result.stdout.split()
    return applied == "True", [int(count) for count in faults]


def test_glibc_defaults_fault_every_page():
    # The premise of the module: without it, each call faults on (nearly) every page.
    applied, faults = _run_and_count_faults("flag", "--keep_host_memory=false")
    assert not applied
    assert all(count >= 0.9 * PAGES for count in faults)


@pytest.mark.parametrize("args", [("function",), ("flag",)], ids=["function", "flag_default"])
def test_kept_memory_stops_page_faults(args):
    applied, faults = _run_and_count_faults(*args)
    assert applied
    # Late calls may still fault now and then; without the setting all 10 do (9 * PAGES at least).
    assert sum(faults) < 3 * PAGES
