"""Process memory readings: resident now, a window's peak (resettable), and the run's peak across resets."""
import sys

import pytest

from compllm.runtime import memory
from compllm.runtime.memory import PeakWindow, current_rss_bytes, peak_memory_bytes, run_peak_rss_bytes

MIB = 2**20
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")


def touch(n_bytes: int) -> bytearray:
    block = bytearray(n_bytes)
    for i in range(0, n_bytes, 4096):  # resident only once written
        block[i] = 1
    return block


@linux_only
def test_a_window_sees_a_transient_peak_and_what_was_kept():
    with PeakWindow() as transient:
        block = touch(200 * MIB)
        del block
    assert transient.exact
    assert transient.peak_above_start >= 190 * MIB
    assert transient.peak_above_end >= 190 * MIB and abs(transient.retained) < 50 * MIB
    with PeakWindow() as kept:
        block = touch(100 * MIB)
    assert kept.retained >= 95 * MIB and kept.peak_above_end < 50 * MIB
    del block


@linux_only
def test_a_reset_never_hides_the_run_peak():
    block = touch(300 * MIB)
    high = current_rss_bytes()
    del block
    assert memory.reset_peak()  # a later window starts low...
    assert memory.peak_rss_bytes() < high
    # ...but the run's peak is kept (give or take the kernel's lazily summed per-CPU counters)
    assert run_peak_rss_bytes() >= high - 4 * MIB and peak_memory_bytes() >= high - 4 * MIB


def test_release_free_heap_is_harmless():
    assert memory.release_free_heap() in (True, False)
    assert current_rss_bytes() > 0


@linux_only
def test_heap_fragmentation_limit_can_be_set():
    assert memory.limit_heap_fragmentation(256 << 10) in (True, False)
    memory.limit_heap_fragmentation(32 << 20)  # back near glibc's default ceiling for the rest of the session
