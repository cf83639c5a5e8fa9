"""The decoder frozen-prefix cache changes no number: a causal-LM run whose plans train only the top
layers gives the same metrics and adapters with the cache as without it, and the cache is used."""

import pytest
import torch

from hierfedlora.engine import Simulation


@pytest.mark.parametrize("method,settings", [("fedlora_topk", {"method.depth": 2}),
                                             ("hierfedlora", {"method.num_groups": 2, "method.depths": [1, 2],
                                                              "method.taus": [1, 2]})])
def test_cached_and_uncached_decoder_training_are_identical(tiny_llm_cfg, method, settings):
    runs = {}
    for cache in (True, False):
        cfg = tiny_llm_cfg(**{"method.name": method, "run.rounds": 2, "run.eval_every": 1, "train.prefix_cache": cache,
                              "model.lora_dropout": 0.1, **settings})
        sim = Simulation(cfg)
        rows = sim.run()
        runs[cache] = (rows, sim.state, sim.cached_layers, sim.model)
    (rows_c, state_c, k, model), (rows_u, state_u, k_u, _) = runs[True], runs[False]
    assert k == 2 and k_u == 0 and len(model.decoder_prefix.rows) > 0 and model.prefix_seconds > 0
    strip = lambda rs: [{key: v for key, v in r.items()} for r in rs]  # noqa: E731
    assert strip(rows_c) == strip(rows_u)
    assert all(torch.equal(state_c[key], state_u[key]) for key in state_u)
