"""The CLI keeps freed memory in the process on glibc (hookviz/memory.py), unless the user tuned malloc."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
from process_helpers import subprocess_env

from hookviz.memory import keep_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocate and free a 64 MiB block 20 times: with glibc's defaults each one is a fresh mmap, page-faulted in again.
CHURN = """
import resource, sys
from hookviz.memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    block = bytearray(64 << 20)
    del block
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not GLIBC, reason="mallopt thresholds are glibc's")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", CHURN, mode], env=subprocess_env(), capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0], int(out[1])

    default_applied, default_faults = faults("default")
    kept_applied, kept_faults = faults("keep")
    assert (default_applied, kept_applied) == ("False", "True")
    assert kept_faults * 5 < default_faults  # ~16k faults per block by default, one block's worth when kept


def test_a_users_own_malloc_setting_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert keep_freed_memory() is False
