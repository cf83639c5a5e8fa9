"""Device profiles and built-in fleets (design.md §3).

A profile says how fast a device computes (sustained training FLOP/s), how much memory it has, and
its two links: WAN (device <-> parameter server: slow, fluctuating) and LAN (device <-> group
aggregator on the same edge network: fast). Simulated time is derived from these numbers only, never
from the host that runs the simulation.

Built-in `jetson80` mirrors the seed papers' 80-device platform (30 TX2-, 40 Xavier NX-, 10 AGX
Orin-class devices). Numbers and their sources (our reading; all are settings, override them with a
fleet file):

| class       | peak FP16 (NVIDIA datasheet) | sustained training FLOP/s used (~20% of peak) | memory |
|-------------|------------------------------|-----------------------------------------------|--------|
| TX2         | 1.33 TFLOPS (256 Pascal cores) | 0.27e12                                     | 8 GB   |
| Xavier NX   | ~6 TFLOPS (384 Volta cores + 48 tensor cores) | 1.2e12                       | 8 GB   |
| AGX Orin    | ~42 TFLOPS dense (2048 Ampere cores + 64 tensor cores) | 8.5e12              | 32 GB  |

Each device's FLOP/s is further scaled by U(0.7, 1.0) (Jetson power modes / thermal throttling).
WAN: uplink log-uniform in [1, 20] Mbit/s, downlink 2x uplink, latency U(20, 80) ms -- the seeds'
platform uses WiFi links whose bandwidth fluctuates in roughly this range. LAN to an edge aggregator:
100 Mbit/s each way, 2 ms (a WiFi LAN). `uniform`: every device a Xavier NX at 10 Mbit/s WAN.

Fleet file format (TOML), one `[[device]]` table per device or per class with `count`:

    [[device]]
    kind = "xavier-nx"      # free text
    count = 40              # optional, default 1
    flops = 1.2e12          # sustained training FLOP/s
    memory_gb = 8
    wan_up_mbps = 10        # WAN uplink; wan_down_mbps defaults to 2x
    wan_down_mbps = 20
    wan_latency_ms = 50
    lan_up_mbps = 100       # optional, default 100
    lan_down_mbps = 100     # optional, default 100
    lan_latency_ms = 2      # optional, default 2
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hierfedlora.errors import ConfigError

MBIT = 1e6 / 8  # bytes per second in one Mbit/s


@dataclass(frozen=True)
class DeviceProfile:
    kind: str
    flops: float  # sustained training FLOP/s
    memory_gb: float
    wan_up_Bps: float  # bytes per second
    wan_down_Bps: float
    wan_latency_s: float
    lan_up_Bps: float = 100 * MBIT
    lan_down_Bps: float = 100 * MBIT
    lan_latency_s: float = 0.002

    def link(self, link: str) -> tuple[float, float, float]:
        """(up bytes/s, down bytes/s, latency s) of the `wan` or `lan` link."""
        if link == "wan":
            return self.wan_up_Bps, self.wan_down_Bps, self.wan_latency_s
        if link == "lan":
            return self.lan_up_Bps, self.lan_down_Bps, self.lan_latency_s
        raise ValueError(f"unknown link '{link}' (use 'wan' or 'lan')")


# class name -> (sustained FLOP/s, memory GB); see the module docstring for the sources.
JETSON_CLASSES = {"tx2": (0.27e12, 8.0), "xavier-nx": (1.2e12, 8.0), "agx-orin": (8.5e12, 32.0)}
JETSON80_MIX = [("tx2", 30), ("xavier-nx", 40), ("agx-orin", 10)]


def _jetson80(rng: np.random.Generator) -> list[DeviceProfile]:
    out = []
    for kind, count in JETSON80_MIX:
        flops, mem = JETSON_CLASSES[kind]
        for _ in range(count):
            up = np.exp(rng.uniform(np.log(1.0), np.log(20.0))) * MBIT
            out.append(
                DeviceProfile(
                    kind=kind,
                    flops=flops * rng.uniform(0.7, 1.0),
                    memory_gb=mem,
                    wan_up_Bps=up,
                    wan_down_Bps=2 * up,
                    wan_latency_s=rng.uniform(0.02, 0.08),
                )
            )
    return out


def _uniform(n: int) -> list[DeviceProfile]:
    flops, mem = JETSON_CLASSES["xavier-nx"]
    return [DeviceProfile("xavier-nx", flops, mem, 10 * MBIT, 20 * MBIT, 0.05) for _ in range(n)]


_FILE_KEYS = {
    "kind", "count", "flops", "memory_gb", "wan_up_mbps", "wan_down_mbps", "wan_latency_ms",
    "lan_up_mbps", "lan_down_mbps", "lan_latency_ms",
}


def load_fleet_file(path: str | Path) -> list[DeviceProfile]:
    """Read a fleet TOML file (format in the module docstring)."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"fleet file '{p}' could not be read: {e}") from None
    tables = raw.get("device")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"fleet file '{p}' has no [[device]] tables (see the format in the README).")
    out: list[DeviceProfile] = []
    for i, t in enumerate(tables):
        for k in t:
            if k not in _FILE_KEYS:
                close = difflib.get_close_matches(k, sorted(_FILE_KEYS), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"fleet file '{p}', device {i}: unknown key '{k}'.{hint}")
        for k in ("flops", "memory_gb", "wan_up_mbps"):
            if k not in t:
                raise ConfigError(f"fleet file '{p}', device {i}: missing required key '{k}'.")
        vals = {k: float(v) for k, v in t.items() if k not in ("kind", "count")}
        if any(v <= 0 for k, v in vals.items() if k != "wan_latency_ms" and k != "lan_latency_ms"):
            raise ConfigError(f"fleet file '{p}', device {i}: flops, memory and bandwidths must be > 0.")
        up = vals["wan_up_mbps"]
        prof = DeviceProfile(
            kind=str(t.get("kind", f"device{i}")),
            flops=vals["flops"],
            memory_gb=vals["memory_gb"],
            wan_up_Bps=up * MBIT,
            wan_down_Bps=vals.get("wan_down_mbps", 2 * up) * MBIT,
            wan_latency_s=vals.get("wan_latency_ms", 50.0) / 1000,
            lan_up_Bps=vals.get("lan_up_mbps", 100.0) * MBIT,
            lan_down_Bps=vals.get("lan_down_mbps", 100.0) * MBIT,
            lan_latency_s=vals.get("lan_latency_ms", 2.0) / 1000,
        )
        out.extend([prof] * int(t.get("count", 1)))
    return out


# A group aggregator on the edge (an edge server wired to the devices' LAN): its WAN link to the PS.
# 50 Mbit/s each way, 20 ms -- a typical wired uplink of a small edge site (our setting).
EDGE_AGGREGATOR = DeviceProfile("edge", flops=0.0, memory_gb=0.0, wan_up_Bps=50 * MBIT, wan_down_Bps=50 * MBIT,
                                wan_latency_s=0.02)


def build_fleet(name: str, num_devices: int, seed: int) -> list[DeviceProfile]:
    """`num_devices` profiles drawn without replacement (seeded) from the named fleet."""
    rng = np.random.default_rng([seed, 1001])
    if name == "jetson80":
        pool = _jetson80(rng)
    elif name == "uniform":
        pool = _uniform(num_devices)
    elif name.endswith(".toml"):
        pool = load_fleet_file(name)
    else:
        raise ConfigError(f"unknown fleet '{name}': use 'jetson80', 'uniform' or a fleet .toml file.")
    if num_devices > len(pool):
        raise ConfigError(
            f"fleet '{name}' has {len(pool)} devices but fleet.num_devices = {num_devices}; lower it or add devices."
        )
    if num_devices == len(pool):
        return pool
    pick = np.sort(rng.choice(len(pool), size=num_devices, replace=False))
    return [pool[i] for i in pick]


def round_profiles(base: list[DeviceProfile], rnd: int, seed: int, jitter: float) -> list[DeviceProfile]:
    """Profiles in force in round `rnd`: WAN bandwidth scaled by a seeded factor U(1-j, 1+j)."""
    if jitter <= 0:
        return base
    rng = np.random.default_rng([seed, 2002, rnd])
    f = rng.uniform(1 - jitter, 1 + jitter, size=len(base))
    return [
        dataclasses.replace(p, wan_up_Bps=p.wan_up_Bps * fi, wan_down_Bps=p.wan_down_Bps * fi)
        for p, fi in zip(base, f)
    ]


def availability(n: int, rnd: int, seed: int, participation: float, dropout: float) -> tuple[list[int], set[int]]:
    """(devices available this round, the subset of them that will drop out mid-round); seeded."""
    rng = np.random.default_rng([seed, 3003, rnd])
    k = max(1, int(round(participation * n)))
    avail = sorted(rng.choice(n, size=k, replace=False).tolist()) if k < n else list(range(n))
    drops = {d for d in avail if rng.random() < dropout}
    return avail, drops
