"""hierfavg, hierarchical FedAvg of LoRA: HierFedLoRA's topology with random groups, every layer
trained and a fixed τ; FedLoRA with one group over the PS."""

from hierfedlora.engine import Simulation
from hierfedlora.grouping import random_groups


def test_one_group_one_sync_over_the_ps_is_fedlora(tiny_cfg):
    common = {"fleet.aggregator": "ps", "run.rounds": 2, "partition.kind": "dirichlet", "partition.min_partition_size": 5}
    fed = Simulation(tiny_cfg(**common)).run()
    hier = Simulation(tiny_cfg(**common, **{"method.name": "hierfavg", "method.num_groups": 1, "method.tau": 1})).run()
    for a, b in zip(fed, hier):
        assert {k: b[k] for k in a} == a


def test_random_groups_every_layer_fixed_tau_over_edge_aggregators(tiny_cfg):
    cfg = tiny_cfg(**{"method.name": "hierfavg", "method.num_groups": 2, "method.tau": 2, "run.rounds": 2,
                      "fleet.aggregator": "edge", "partition.kind": "dirichlet", "partition.min_partition_size": 5})
    sim = Simulation(cfg)
    assert sim.strategy.groups == random_groups(cfg.fleet.num_devices, 2, cfg.run.seed)
    assert sorted(len(g) for g in sim.strategy.groups) == [2, 2]
    rows = sim.run()
    assert all(g["depth"] == 4 and g["tau"] == 2 for r in rows[1:] for g in r["groups"])
    assert rows[-1]["bytes_lan"] > 0 and rows[-1]["bytes_wan"] > 0  # devices on the LAN, aggregators on the WAN
    # exactly HierFedLoRA with the same three settings pinned
    same = Simulation(tiny_cfg(**{"method.name": "hierfedlora", "method.num_groups": 2, "method.grouping": "random",
                                  "method.fixed_depth": 4, "method.fixed_tau": 2, "run.rounds": 2,
                                  "fleet.aggregator": "edge", "partition.kind": "dirichlet",
                                  "partition.min_partition_size": 5})).run()
    assert rows == same
