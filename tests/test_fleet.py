import pytest

from hierfedlora.fleet import availability, build_fleet, load_fleet_file, round_profiles


def test_jetson80_mix_and_seeding():
    f = build_fleet("jetson80", 80, seed=0)
    kinds = [p.kind for p in f]
    assert (kinds.count("tx2"), kinds.count("xavier-nx"), kinds.count("agx-orin")) == (30, 40, 10)
    tx2 = max(p.flops for p in f if p.kind == "tx2")
    orin = min(p.flops for p in f if p.kind == "agx-orin")
    assert orin > 10 * tx2
    assert build_fleet("jetson80", 20, seed=3) == build_fleet("jetson80", 20, seed=3)
    assert build_fleet("jetson80", 20, seed=3) != build_fleet("jetson80", 20, seed=4)


def test_fleet_file(tmp_path):
    p = tmp_path / "f.toml"
    p.write_text('[[device]]\nkind="a"\ncount=3\nflops=1e12\nmemory_gb=4\nwan_up_mbps=8\n')
    f = load_fleet_file(p)
    assert len(f) == 3 and f[0].wan_up_Bps == 1e6 and f[0].wan_down_Bps == 2e6
    p.write_text('[[device]]\nflops=1e12\nmemory_gb=4\nwan_up_mbs=8\n')
    with pytest.raises(ValueError, match="wan_up_mbps"):
        load_fleet_file(p)
    with pytest.raises(ValueError, match="has 3 devices"):
        p.write_text('[[device]]\ncount=3\nflops=1e12\nmemory_gb=4\nwan_up_mbps=8\n')
        build_fleet(str(p), 5, 0)


def test_fluctuation_and_availability_are_seeded():
    base = build_fleet("uniform", 10, 0)
    a, b = round_profiles(base, 3, 0, 0.5), round_profiles(base, 3, 0, 0.5)
    assert a == b and a != base and round_profiles(base, 4, 0, 0.5) != a
    assert all(0.5 * p.wan_up_Bps <= q.wan_up_Bps <= 1.5 * p.wan_up_Bps for p, q in zip(base, a))
    avail, drops = availability(10, 1, 0, 0.5, 0.5)
    assert len(avail) == 5 and drops <= set(avail)
    assert (avail, drops) == availability(10, 1, 0, 0.5, 0.5)
