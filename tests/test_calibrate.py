"""`hierfedlora calibrate`: the measured profile is a fleet file the simulator runs on, and its
FLOP/s is the clock's FLOPs of the timed job over its measured seconds."""

from __future__ import annotations

import tomllib

import pytest

from hierfedlora.calibrate import Measurement, fleet_file_text
from hierfedlora.cli import main
from hierfedlora.engine import Simulation
from hierfedlora.fleet import MBIT, load_fleet_file


def test_flops_is_the_jobs_flops_over_the_median_seconds():
    m = Measurement("m", "cpu", 16, 64, 8, 4, job_flops=6e9, job_seconds=[3.0, 2.0, 9.0], memory_gb=4.0)
    assert m.flops == pytest.approx(2e9)
    text = fleet_file_text(m, "lab-box", count=3, wan_up_mbps=5, wan_latency_ms=30)
    (dev,) = tomllib.loads(text)["device"]
    assert dev == {"kind": "lab-box", "count": 3, "flops": 2e9, "memory_gb": 4.0, "wan_up_mbps": 5,
                   "wan_down_mbps": 10, "wan_latency_ms": 30}


def test_calibrate_writes_a_fleet_file_the_simulator_runs_on(tmp_path, tiny_cfg, capsys):
    out = tmp_path / "me.toml"
    assert main(["calibrate", "--model", "tiny-bert", "--max-length", "16", "--batch-size", "4", "--steps", "2",
                 "--repeats", "2", "--count", "2", "--wan-up-mbps", "20", "--out", str(out)]) == 0
    assert "GFLOP/s" in capsys.readouterr().out
    profiles = load_fleet_file(out)
    assert len(profiles) == 2 and profiles[0].flops > 0 and profiles[0].memory_gb > 0
    assert profiles[0].wan_up_Bps == 20 * MBIT and profiles[0].wan_down_Bps == 40 * MBIT
    sim = Simulation(tiny_cfg(**{"fleet.name": str(out), "fleet.num_devices": 2, "run.rounds": 1}))
    rows = sim.run()
    assert sim.base_profiles == profiles and rows[-1]["sim_time_s"] > 0


@pytest.mark.parametrize("args, named", [
    (["--steps", "0"], "--steps"),
    (["--wan-up-mbps", "-1"], "--wan-up-mbps"),
    (["--out", "."], "is a directory"),
    (["--out", "no/such/folder/f.toml"], "does not exist"),
])
def test_bad_calibrate_arguments_are_named(args, named, capsys):
    assert main(["calibrate", "--model", "tiny-bert", *args]) == 2
    assert named in capsys.readouterr().err
