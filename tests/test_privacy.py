"""Client-level DP of the updates (`privacy`, `[privacy]`): clipping, noise scale, the accountant
against dp_accounting itself, and the runs: DP with no noise and no clipping changes nothing, a
resumed run reports the same ε, joined devices are privatised each as alone, refused methods."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from hierfedlora import privacy
from hierfedlora.cli import main
from hierfedlora.config import build_config
from hierfedlora.device.train import privatise
from hierfedlora.engine import Simulation
from hierfedlora.errors import ConfigError
from hierfedlora.experiment import run_experiment
from hierfedlora.fast.joined import JoinedExecutor
from hierfedlora.protocol import DeviceJob, DevicePlan, LocalDP, LocalTraining, TrainResult


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_dp(rows):
    return [{k: v for k, v in r.items() if not k.startswith("dp_")} for r in rows]


def dp(mode: str, clip: float, sigma: float) -> dict:
    return {"privacy.dp": mode, "privacy.clip_norm": clip, "privacy.noise_multiplier": sigma}


# -- clipping ---------------------------------------------------------------------------------
def test_clip_scales_a_delta_of_known_norm_to_exactly_c_and_touches_only_uploaded_keys():
    ref = {"0.q.A": torch.randn(2, 3), "0.q.B": torch.randn(3, 2), "head.c.weight": torch.randn(2, 3)}
    # Δ: 3 on one coordinate of A, 4 on one of the head: ‖Δ‖₂ = 5 over both tensors together
    up = {k: v.clone() for k, v in ref.items()}
    up["0.q.A"][0, 0] += 3.0
    up["head.c.weight"][1, 2] += 4.0
    up["0.q.B"] += 7.0  # not uploaded: never clipped
    out, norm = privacy.clip_update(up, ref, ["0.q.A", "head.c.weight"], 2.0)
    assert norm == pytest.approx(5.0, rel=1e-6)
    assert privacy.update_norm(out, ref, ["0.q.A", "head.c.weight"]) == pytest.approx(2.0, rel=1e-6)
    assert float(out["0.q.A"][0, 0] - ref["0.q.A"][0, 0]) == pytest.approx(3.0 * 2 / 5, rel=1e-5)  # direction kept
    assert float(out["head.c.weight"][1, 2] - ref["head.c.weight"][1, 2]) == pytest.approx(4.0 * 2 / 5, rel=1e-5)
    assert out["0.q.B"] is up["0.q.B"]
    # within the bound: the very tensors, bit for bit
    same, n = privacy.clip_update(up, ref, ["0.q.A", "head.c.weight"], 5.5)
    assert n == pytest.approx(5.0, rel=1e-6) and all(same[k] is up[k] for k in up)


# -- noise ------------------------------------------------------------------------------------
def test_local_noise_has_std_sigma_c_and_is_a_function_of_seed_round_device_call():
    payload = {"head.c.weight": torch.zeros(400, 500), "3.q.A": torch.zeros(4, 32)}
    plan = DevicePlan(2, {3: 4}, (3,), 1)
    settings = LocalTraining(seed=5, batch_size=8, lr=0.1, weight_decay=0.0, backward_ratio=1.0,
                             local_dp=LocalDP(clip_norm=0.5, noise_multiplier=1.5))
    update = {k: v.clone() for k, v in payload.items()}  # Δ = 0: what comes back is the noise alone
    out, norm = privatise(update, DeviceJob(plan, payload, 0), 1, settings)
    assert norm == 0.0
    assert float(out["head.c.weight"].std()) == pytest.approx(1.5 * 0.5, rel=0.02)
    again, _ = privatise(update, DeviceJob(plan, payload, 0), 1, settings)
    other, _ = privatise(update, DeviceJob(plan, payload, 1), 1, settings)
    assert torch.equal(again["head.c.weight"], out["head.c.weight"])
    assert not torch.equal(other["head.c.weight"], out["head.c.weight"])
    none = LocalTraining(seed=5, batch_size=8, lr=0.1, weight_decay=0.0, backward_ratio=1.0)
    assert privatise(update, DeviceJob(plan, payload, 0), 1, none) == (update, None)


def test_central_noise_on_the_mean_of_m_has_std_sigma_c_over_m_and_counts_a_release_per_device():
    cfg = build_config({"fleet": {"num_devices": 5}}, [f"{k}={v!r}".replace("'", '"') for k, v in dp("central", 2.0, 3.0).items()])
    sim = SimpleNamespace(cfg=cfg, dp_releases=[0] * 5)
    ctx = SimpleNamespace(rnd=1, releases=0)
    state = {"head.c.weight": torch.zeros(500, 400), "0.q.A": torch.zeros(4, 8)}
    m = 4
    results = [TrainResult(d, {"head.c.weight": torch.zeros(500, 400)}, 1, 0.0, 0, 0, 0, 0, 0) for d in range(m)]
    out = Simulation._release(sim, ctx, state, results)
    assert float(out["head.c.weight"].std()) == pytest.approx(3.0 * 2.0 / m, rel=0.02)
    assert out["0.q.A"] is state["0.q.A"]  # no update holds it: the aggregate left it, so it stays exact
    assert sim.dp_releases == [1, 1, 1, 1, 0] and ctx.releases == 1
    second = Simulation._release(sim, ctx, state, results)  # the round's next release draws fresh noise
    assert not torch.equal(second["head.c.weight"], out["head.c.weight"])


# -- the accountant ---------------------------------------------------------------------------
@pytest.mark.parametrize("sigma,k,delta", [(1.0, 1, 1e-5), (0.8, 30, 1e-5), (2.5, 200, 1e-6)])
def test_epsilon_is_dp_accountings_own_rdp_composition(sigma, k, delta):
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(sigma), count=k)  # composed directly, not through our wrapper
    assert privacy.epsilon(sigma, k, delta) == acc.get_epsilon(delta)


def test_epsilon_matches_the_librarys_published_value_and_its_limits():
    # dp_accounting's rdp_privacy_accountant_test.test_compute_epsilon_delta_gaussian: one Gaussian
    # release of multiplier 4.530877117 is exactly (1, 1e-6)-DP
    assert privacy.epsilon(4.530877117, 1, 1e-6) == pytest.approx(1.0, abs=1e-5)
    assert privacy.epsilon(1.0, 0, 1e-5) == 0.0
    assert math.isinf(privacy.epsilon(0.0, 3, 1e-5)) and privacy.json_epsilon(privacy.epsilon(0.0, 3, 1e-5)) is None
    eps = [privacy.epsilon(1.0, k, 1e-5) for k in (1, 2, 8)]
    assert eps == sorted(eps) and eps[0] < eps[-1]


# -- settings ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sets,says", [
    (['privacy.dp="local"'], "privacy.clip_norm"),
    (['privacy.dp="central"', "privacy.noise_multiplier=1.0"], "privacy.clip_norm"),
    (["privacy.noise_multiplier=-0.5"], "privacy.noise_multiplier"),
    (["privacy.delta=1.0"], "privacy.delta"),
    (["privacy.delta=0.0"], "privacy.delta"),
    (["privacy.clip_norm=0.0"], "privacy.clip_norm"),
    (['privacy.dp="centrall"'], "privacy.dp"),
])
def test_bad_privacy_settings_are_config_errors_naming_the_key(sets, says):
    with pytest.raises(ConfigError, match=says):
        build_config({}, sets)


def test_dp_off_hashes_as_before_the_setting_existed():
    """Checkpoints written before [privacy] existed still resume: with dp off the config
    fingerprint is the one the code before it computed (these values)."""
    from hierfedlora.engine import config_fingerprint

    assert config_fingerprint(build_config({})) == "08a1bd4669534163"
    assert config_fingerprint(build_config({}, ['method.name="hierfedlora"'])) == "1804594605a6c9a3"
    assert config_fingerprint(build_config({}, ['privacy.dp="local"', "privacy.clip_norm=1.0"])) != "08a1bd4669534163"


@pytest.mark.parametrize("method", ["hetlora", "flexlora", "legend"])
def test_central_dp_is_refused_for_methods_without_a_uniform_mean(tiny_cfg, method):
    cfg = tiny_cfg(**{"method.name": method, **dp("central", 1.0, 1.0)})
    with pytest.raises(ConfigError, match=rf'method.name = "{method}".*privacy.dp = "local"') as e:
        Simulation(cfg)
    assert {"hetlora": "norm", "flexlora": "SVD", "legend": "holders"}[method] in str(e.value)


# -- runs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fedlora", "hierfedlora"])
def test_dp_without_noise_or_clipping_equals_the_run_without_dp(tiny_cfg, method):
    """σ = 0 and C = 1e9: local and central DP change no number but add dp_* columns. Central
    weighs every update 1; every device holds 64 examples (a power of two, so n·x/Σn is x/m to the
    bit) and the data-weighted mean is the uniform one."""
    base = {"run.rounds": 2, "data.max_examples": 366, "method.name": method}
    if method == "hierfedlora":
        base.update({"method.num_groups": 2, "method.fixed_tau": 2})
    off = Simulation(tiny_cfg(**base))
    assert off.setup.num_examples == [64] * 4
    rows = off.run()
    assert not any(k.startswith("dp_") for r in rows for k in r)
    for mode in ("local", "central"):
        sim = Simulation(tiny_cfg(**base, **dp(mode, 1e9, 0.0)))
        got = sim.run()
        assert without_dp(got) == rows, mode
        assert got[-1]["dp_epsilon"] is None and got[-1]["dp_clipped_fraction"] == 0.0  # ε = ∞: no noise
        assert got[-1]["dp_releases"] == (2 if method == "fedlora" else 4)  # hierfedlora: τ = 2 per round
        assert got[-1]["dp_update_norm"] > 0


def test_resumed_dp_run_reports_the_same_epsilon_and_metrics(tiny_cfg, tmp_path, interrupted_run):
    cfg = tiny_cfg(**{"run.rounds": 4, "run.eval_every": 2, "run.checkpoint_every": 2, **dp("local", 0.5, 1.0)})
    run_experiment(cfg, tmp_path / "a", progress=False, export=False)
    interrupted_run(cfg, tmp_path / "b", after=3)  # checkpoint at round 2
    assert main(["run", "--resume", str(tmp_path / "b"), "--quiet"]) == 0
    a, b = read_rows(tmp_path / "a" / "metrics.jsonl"), read_rows(tmp_path / "b" / "metrics.jsonl")
    assert a == b and a[-1]["dp_releases"] == 4 and a[-1]["dp_epsilon"] > a[1]["dp_epsilon"] > 0
    sa = json.loads((tmp_path / "a" / "summary.json").read_text())
    sb = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert {k: v for k, v in sa.items() if k != "wall_time_s"} == {k: v for k, v in sb.items() if k != "wall_time_s"}
    assert sa["dp_epsilon"] == a[-1]["dp_epsilon"] and sa["dp_mode"] == "local" and sa["dp_delta"] == 1e-5


def test_local_dp_of_joined_devices_equals_one_at_a_time(tiny_cfg):
    """train.lockstep = 8 trains the four devices in one joined batch; each is privatised with its
    own noise exactly as when it trains alone."""
    sets = {"run.rounds": 2, "train.batch_size": 16, **dp("local", 0.5, 0.7)}  # 16: the joined path's smallest batch
    joined = Simulation(tiny_cfg(**sets, **{"train.lockstep": 8, "train.workers": 1}))
    assert isinstance(joined.executor, JoinedExecutor)
    plan = DevicePlan(0, joined.global_ranks, tuple(range(4)), 2)
    jobs = [DeviceJob(DevicePlan(d, plan.ranks, plan.train_layers, 2), {}, 0) for d in range(4)]
    assert joined.executor.groups(jobs) == [[0, 1, 2, 3]]  # really joined
    alone = Simulation(tiny_cfg(**sets, **{"train.lockstep": 1, "train.workers": 1}))
    a, b = joined.run(), alone.run()
    assert a == b and a[-1]["dp_clipped_fraction"] > 0  # the bound bites, the noise is there, same numbers


def test_flower_settings_record_carries_local_dp():
    from hierfedlora.flower import messages as wire

    s = LocalTraining(seed=1, batch_size=8, lr=0.1, weight_decay=0.0, backward_ratio=1.0, local_dp=LocalDP(2.0, 0.5))
    assert wire.settings_from_record(wire.settings_record(s, "fp"), {}).local_dp == LocalDP(2.0, 0.5)
    off = LocalTraining(seed=1, batch_size=8, lr=0.1, weight_decay=0.0, backward_ratio=1.0)
    assert "dp-clip-norm" not in wire.settings_record(off, "fp")
    assert wire.settings_from_record(wire.settings_record(off, "fp"), {}).local_dp is None


def test_local_releases_are_counted_when_the_device_keeps_its_norm(tiny_cfg):
    """A Flower SuperNode privatises its update but does not send its norm: the engine still counts
    the release (ε grows), and reports no update norm for the round."""
    from dataclasses import replace

    from hierfedlora.engine import local_executor

    class NoNorms:
        def __init__(self, sim):
            self.inner = local_executor(sim)

        def run(self, rnd, jobs):
            return [replace(o, update_norm=None) for o in self.inner.run(rnd, jobs)]

        def evaluate(self, payload, ranks, batches):
            return self.inner.evaluate(payload, ranks, batches)

        def close(self):
            self.inner.close()

    rows = Simulation(tiny_cfg(**{"run.rounds": 2, **dp("local", 0.5, 1.0)}), executor=NoNorms).run()
    assert [r["dp_releases"] for r in rows[1:]] == [1, 2]
    assert rows[-1]["dp_epsilon"] == privacy.epsilon(1.0, 2, 1e-5) and rows[-1]["dp_update_norm"] is None
