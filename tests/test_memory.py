"""Peak-memory measurement: a phase's peak covers what it allocates."""

import sys

import pytest
import torch

from funcbo.memory import PhaseMeter, reset_peak, use_low_mmap_threshold


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc/self/clear_refs")
def test_phase_meter_sees_a_large_allocation_in_its_phase():
    if not reset_peak():
        pytest.skip("the peak resident set cannot be reset here")
    # batched RL runs earlier in this process keep freed blocks in malloc's heap, where a new
    # allocation would not show in the resident set
    use_low_mmap_threshold()
    meter = PhaseMeter()
    meter.start()
    with meter.phase("small"):
        torch.ones(10)
    small = meter.phases["small"]["peak_mb"]
    with meter.phase("large"):
        x = torch.ones(16 * 2**20 // 4)  # 16 MB, touched
        del x
    with meter.phase("small"):  # a phase entered twice: summed time, larger peak
        pass
    assert set(meter.phases) == {"small", "large"}
    assert meter.phases["large"]["peak_mb"] >= 15.0
    assert small < 8.0
    assert meter.phases["small"]["peak_mb"] >= small
    assert meter.phases["small"]["time_s"] >= 0
    meter.start()
    assert meter.phases == {}
