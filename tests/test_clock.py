import pytest

from hierfedlora.clock import ModelCost, TrafficMeter, compute_time, step_flops, transfer_time
from hierfedlora.fleet import MBIT, DeviceProfile


def test_layer_flops_formula():
    c = ModelCost(hidden=4, intermediate=8)
    # 2·n·(4h² + 2hi) + 4n²h with n=3, h=4, i=8: 2·3·(64 + 64) + 4·9·4 = 768 + 144
    assert c.layer_fwd_flops(3) == 912


def test_two_device_round_hand_computed():
    """Two devices, one step each; round time = slowest of down + compute + up."""
    c = ModelCost(hidden=4, intermediate=8)
    fast = DeviceProfile("fast", flops=1000.0, memory_gb=1, wan_up_Bps=100.0, wan_down_Bps=200.0, wan_latency_s=0.5)
    slow = DeviceProfile("slow", flops=100.0, memory_gb=1, wan_up_Bps=10.0, wan_down_Bps=20.0, wan_latency_s=1.0)
    # forward through 6 layers + backward (ratio 1) through 2: 912·(6 + 2) = 7296 FLOPs for one 3-token sample
    f = step_flops(c, [3], num_layers=6, trained_layers=2, backward_ratio=1.0)
    assert f == 7296
    nbytes = 400
    t = {}
    for p in (fast, slow):
        t[p.kind] = transfer_time(nbytes, p.wan_down_Bps, p.wan_latency_s) + compute_time(f, p) + transfer_time(nbytes, p.wan_up_Bps, p.wan_latency_s)
    assert t["fast"] == pytest.approx(0.5 + 2 + 7.296 + 0.5 + 4)
    assert t["slow"] == pytest.approx(1 + 20 + 72.96 + 1 + 40)
    assert max(t.values()) == t["slow"]


def test_no_bytes_no_time_and_meter_totals():
    assert transfer_time(0, 1.0, 5.0) == 0.0
    m = TrafficMeter()
    m.add("wan", up=10, down=20)
    m.add("lan", up=1)
    assert (m.bytes_up, m.bytes_down, m.up["lan"]) == (11, 20, 1)
    assert MBIT == 125000.0
