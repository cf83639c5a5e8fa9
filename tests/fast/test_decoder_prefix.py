"""The decoder frozen-prefix cache changes no result: a causal-LM run whose plans train only the top
layers gives the same metrics and adapters with the cache as without it (to float rounding: the
cache is filled with the examples' shared prompt prefix run once, `shared_prefix`), and the cache
is used."""

import math

import pytest
import torch

from hierfedlora.engine import Simulation


def _close(a, b, where="rows"):
    """Equal, floats to 1e-5 relative, through nested rows."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys(), where
        for k in b:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7), (where, a, b)
    else:
        assert a == b, (where, a, b)


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
    assert len(model.decoder_prefix.prompts) > 0 and model.decoder_prefix.prompt_hits > 0  # evaluations reused the cached layers' prompt KV
    _close(rows_c, rows_u)
    for key in state_u:
        assert torch.allclose(state_c[key], state_u[key], rtol=1e-4, atol=1e-6), key
