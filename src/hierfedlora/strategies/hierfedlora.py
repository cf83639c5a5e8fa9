"""HierFedLoRA (design.md §2, the main system): near-IID device groups, a bandit per group choosing
fine-tuning depth and intra-group frequency, and layer-wise aggregation at the PS.

Setup (once). Devices are split into K groups by `grouping.group_devices` (design.md §2 step 1): pooled
label histograms close to the global one, plus λ times the spread of the devices' predicted round
times (one full-depth intra-group round: E local steps + model down/up on the group link, from the
base profiles). The grouping is reported per group in `grouping.json`.

Private grouping (`grouping_input`, SPEC §5; docs/privacy.md). What the grouping reads:
"histograms" every device's label counts (the papers' setting); "ldp" counts each device noised
with Laplace at ε = `grouping_epsilon` before upload; "pooled" only pooled sums of ≥ 2 devices,
through secure aggregation, in a federated version of the greedy (ε, if set, in total over the
releases); "embeddings" no labels at all: a `sketch_dim`-dimensional random projection of each
device's mean token embedding (`SetupInfo.device_embeddings`), for tasks without labels. All four
minimise the same J (`private_grouping`). grouping.json's `private_grouping` block names the input
and ε and sets Σ_k KL(P_k‖P) of the chosen groups beside the exact greedy's and random groups',
all three measured with the true histograms (evaluation only; the grouping never read them).

Each global round, for every group k with available members (groups run concurrently in simulated
time; the global round ends when the last group reports, design.md §3):

1. *Arm* (design.md §2 step 2). The group's R-UCB bandit (`bandit.RUCB`) picks (d_k, τ_k) among the
   eligible arms of `depths × taus`. An arm is eligible when its predicted round time fits the time
   budget and (if set) its predicted traffic fits `traffic_budget_mb`. Predictions use
   `SetupInfo.predict_compute_s / payload_bytes / predict_transfer_s` with this round's profiles
   (`ctx.profiles`, so fluctuating bandwidth counts):
       T(d, τ) = [edge: t_wan(full↓)] + Σ_{s<τ} max_{i∈k} (C_i(d) + t_i(down_s↓, top_d↑)) + [edge: t_wan(top_d↑)]
   with down_0 = all layers + head and down_s = top d + head afterwards. The time budget, unless
   `round_budget_s` fixes it, is `budget_factor` × the FedLoRA-equivalent round time: what one
   FedLoRA round (all layers, one WAN exchange with the PS) takes its slowest device, over all
   available devices (`budget_scope = "round"`) or over the group's members (`"group"`). Why this
   default: with factor 1 a HierFedLoRA round is never predicted to be slower than a FedLoRA round,
   and with the "round" scope a group of fast devices may spend the time the synchronous round
   waits for the slowest group anyway (on deeper training or more syncs), instead of idling. If no
   arm is eligible the arm with the smallest predicted time is played (recorded as not eligible).
   `fixed_depth` / `fixed_tau` pin one coordinate (ablations); pinning both bypasses the budget.
2. *Local training and intra-group FedAvg* (design.md §2 steps 3-4), τ_k times: each member trains E
   local steps on LoRA of its top d_k layers (L-d_k .. L-1) + the head, with no backward below;
   it still applies the frozen group-model LoRA of the lower layers, so the plan gives every layer
   the global rank. From the second intra-group round on, devices already hold the frozen layers
   and download only the trained ones. The group aggregator takes the data-weighted FedAvg of the
   trained layers and the head; lower layers stay as the global model had them (under central DP
   the group aggregator adds the noise, `RoundContext.release`; the PS's average of the noised
   group models is post-processing). An intra-group
   round lasts `Exchange.time_s` of the group's members: its slowest member's job, or its
   aggregator's wait for a member that dropped out or missed `fleet.deadline_s` (design.md §3;
   such an update is not averaged); a group none of whose updates arrives stops there for this
   round. Intra-group round
   s of every group goes to the devices as one batch of jobs (the groups do not depend on each
   other within a round), so the simulator's workers can share out all groups' jobs at once.
3. *Links* (design.md §3). With `fleet.aggregator = "edge"` devices talk to an edge aggregator over the
   LAN, and the aggregator exchanges the group model with the PS over its own WAN link
   (`fleet.EDGE_AGGREGATOR`): the whole model down at the start of the round, the trained layers
   and the head up at the end. With `"ps"` the PS is the group aggregator: devices use the WAN for
   every intra-group sync and there is no extra hop.
4. *Reward*: r = gain in validation metric of the group model over the global model it started
   from, per simulated second of the group's round (`reward = "loss"`: L_before − L_after;
   `"accuracy"`: A_after − A_before, where A is the run's score, `run.metric`: accuracy or
   macro-F1). Validation runs on the validation split through
   `ctx.validate` (never the test split): once for the global model at the start of the round and
   once per group; its size is `data.val_fraction`.

Then the PS aggregates layer-wise (`layerwise_aggregate`): each layer's LoRA is the data-weighted
average over the groups that trained it, the head over all groups, and untouched layers keep their
value. A key that only one group sent is copied, not re-averaged, so K = 1, d = L, τ = 1 with
`fleet.aggregator = "ps"` reproduces FedLoRA bit for bit.

Outputs: each metrics.jsonl row gains `val_loss_start` (validation loss of the global model the
round started from) and `groups`, one entry per group: the arm played (`depth`, `tau`), the group's
simulated round time `time_s`, its `predicted_s` and `budget_s`, whether the arm was `eligible`,
the `reward` and the group model's `val_loss` / `val_acc` / `val_macro_f1`, and the devices that reported
(`participants`). `write_outputs` adds `arms.png` (arms per group over rounds) and `grouping.json`.

Randomness: the grouping uses seeds derived from `SetupInfo.seed`; the bandits' order of first
tries uses `ctx.rng`. The groups and the bandits' statistics are in `state_dict`, so a resumed run
repeats the uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hierfedlora.aggregate import slot_average
from hierfedlora.bandit import RUCB
from hierfedlora.clock import transfer_time
from hierfedlora.errors import CheckpointError, ConfigError
from hierfedlora.fleet import EDGE_AGGREGATOR, DeviceProfile
from hierfedlora.grouping import group_by, group_devices, grouping_report, pooled_kl, random_groups, size_bounds
from hierfedlora.lora_state import State, head_and_layers, num_bytes
from hierfedlora.private_grouping import ldp_histograms, pooled_grouping, random_projection, sketch_statistic
from hierfedlora.protocol import DevicePlan, Job, RoundContext, RoundReport, Scores, SetupInfo, TrainResult
from hierfedlora.strategies.base import StrategyBase, weighted_loss

NAME = "hierfedlora"

_EPSILON_MEANING = {
    "histograms": "no privacy: the server reads every device's label counts",
    "ldp": "per device: each uploaded histogram is ε-DP (one example's label replaced); ε unset = no noise",
    "pooled": "in total over all pooled-sum releases (ε/(grouping_passes+1) each); ε unset = exact sums",
    "embeddings": "no DP guarantee: no label is sent, but the sketch is not noised",
}
_REL_TOL = 1e-9  # an arm predicted to take exactly the budget is eligible despite float rounding


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_groups: int = Field(4, ge=1, description="K: number of device groups (at most fleet.num_devices).")
    grouping_lambda: float = Field(0.05, ge=0, description=(
        "λ: weight of the resource spread Var(log t)/Var_fleet(log t) against Σ KL(P_k‖P) in the grouping "
        "objective; 0 groups by labels only."))
    size_slack: float = Field(0.0, ge=0, description=(
        "Balance of group sizes: sizes lie in [floor(n/K·(1-s)), ceil(n/K·(1+s))]; 0 = equal sizes (±1)."))
    grouping_passes: int = Field(20, ge=0, description="Most refinement sweeps of the greedy grouping.")
    grouping: Literal["near_iid", "random"] = Field("near_iid", description=(
        "near_iid: the KL + λ·spread grouping above; random: seeded random equal-size groups (ablation)."))
    grouping_input: Literal["histograms", "ldp", "pooled", "embeddings"] = Field("histograms", description=(
        "What the near-IID grouping sees (private_grouping): histograms = every device's label counts (exact); "
        "ldp = counts with Laplace noise at ε per device; pooled = pooled sums of ≥ 2 devices only (secure "
        "aggregation); embeddings = a random projection of each device's mean token embedding (no labels)."))
    grouping_epsilon: float | None = Field(None, description=(
        "ε of the private grouping inputs (ldp: per device; pooled: in total over all releases); unset = ∞, no noise."))
    sketch_dim: int = Field(16, ge=1, description="Dimension of the label-free sketch (grouping_input = embeddings).")
    depths: list[int] | None = Field(None, description="Arm depths d (top layers that train LoRA); unset = 1..L.")
    taus: list[int] = Field([1, 2, 4], description="Arm frequencies τ (intra-group rounds per global round).")
    fixed_depth: int | None = Field(None, ge=1, description="Pin the depth (ablation); the bandit then picks τ only.")
    fixed_tau: int | None = Field(None, ge=1, description="Pin the frequency (ablation); the bandit then picks d only.")
    exploration: float = Field(0.2, ge=0, description=(
        "c in UCB = μ/s + c·sqrt(2 ln t / n); rewards are scaled by the largest |reward| seen (s), so c is unitless."))
    reward: Literal["loss", "accuracy"] = Field("loss", description=(
        "Validation metric whose gain per simulated second is the reward (accuracy: the run's score, run.metric)."))
    budget_scope: Literal["round", "group"] = Field("round", description=(
        "Default time budget from the FedLoRA-equivalent round time of the slowest available device ('round') "
        "or of the group's slowest member ('group')."))
    budget_factor: float = Field(1.0, gt=0, description="Time budget = this × the FedLoRA-equivalent round time.")
    round_budget_s: float | None = Field(None, gt=0, description="Fixed time budget per group per global round (s); overrides the above.")
    traffic_budget_mb: float | None = Field(None, gt=0, description=(
        "Traffic budget per group per global round (MB = 1e6 bytes, device links + aggregator↔PS); unset = none."))

    @field_validator("grouping_epsilon")
    @classmethod
    def _epsilon_positive(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError("ε must be > 0 (smaller ε = more noise); leave method.grouping_epsilon unset for no noise (ε = ∞)")
        return v

    @field_validator("depths", "taus")
    @classmethod
    def _positive_unique(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v or any(x < 1 for x in v) or len(set(v)) != len(v):
            raise ValueError("must be a non-empty list of distinct integers >= 1")
        return sorted(v)


# -- pure pieces ---------------------------------------------------------------------------------

def arm_cost(setup: SetupInfo, members: list[int], profiles: list[DeviceProfile], depth: int, tau: int,
             link: str, edge: bool) -> tuple[float, int]:
    """Predicted (seconds, bytes) of one global round of a group playing (d, τ) (formula: module doc)."""
    L = setup.layout.num_layers
    ranks = {l: setup.rank for l in range(L)}
    full = setup.payload_bytes(ranks)
    top = setup.payload_bytes(ranks, list(range(L - depth, L)))

    def member(i: int, first: bool) -> float:  # C_i(d) + t_i(down↓, top↑)
        return (setup.predict_compute_s(i, depth, profile=profiles[i])
                + setup.predict_transfer_s(i, full if first else top, top, link, profiles[i]))

    seconds = sum(max(member(i, s == 0) for i in members) for s in range(tau))
    nbytes = len(members) * (full + top + (tau - 1) * 2 * top)
    if edge:
        up, down, lat = EDGE_AGGREGATOR.link("wan")
        seconds += transfer_time(full, down, lat) + transfer_time(top, up, lat)
        nbytes += full + top
    return float(seconds), int(nbytes)


def fedlora_round_s(setup: SetupInfo, devices: list[int], profiles: list[DeviceProfile]) -> float:
    """max_i C_i(L) + t_i^wan(full↓, full↑): one FedLoRA round of the slowest of `devices`."""
    L = setup.layout.num_layers
    full = setup.payload_bytes({l: setup.rank for l in range(L)})
    return float(max(setup.predict_compute_s(i, L, profile=profiles[i])
                     + setup.predict_transfer_s(i, full, full, "wan", profiles[i]) for i in devices))


def layerwise_aggregate(base: State, group_updates: list[State], weights: list[float]) -> State:
    """x_l = Σ_{k trained l} N_k·x_l^k / Σ_{k trained l} N_k per layer (head: over all groups); layers
    nobody trained keep `base`. A key held by one group is copied: N·x/N need not be x in floats."""
    out = slot_average(base, group_updates, weights)
    for key in base:
        holders = [u for u in group_updates if key in u]
        if len(holders) == 1:
            out[key] = holders[0][key]
    return out


def reward_of(before: Scores, after: Scores, seconds: float, metric: str) -> float:
    """r = (L_before − L_after)/T with metric "loss", else (A_after − A_before)/T with A the score
    `metric` names ("accuracy", "macro_f1": `Scores.metric`)."""
    gain = before.loss - after.loss if metric == "loss" else after.metric(metric) - before.metric(metric)
    return gain / seconds


# -- the strategy --------------------------------------------------------------------------------

class Strategy(StrategyBase):
    # each group aggregator's FedAvg is the mean of its members' sum (`Job.aggregator` = group); the PS
    # then averages group models, which are no single device's update
    secure_aggregation_refusal = None

    def __init__(self, settings: Settings, setup: SetupInfo):
        self.s = settings
        self.setup = setup
        self.L = L = setup.layout.num_layers
        depths = [settings.fixed_depth] if settings.fixed_depth else (settings.depths or list(range(1, L + 1)))
        if max(depths) > L:
            raise ConfigError(f"method.depths / method.fixed_depth: depth {max(depths)} exceeds the model's {L} layers")
        taus = [settings.fixed_tau] if settings.fixed_tau else settings.taus
        self.arms: list[tuple[int, int]] = [(d, t) for d in depths for t in taus]
        n = setup.num_devices
        if settings.num_groups > n:
            raise ConfigError(f"method.num_groups = {settings.num_groups} exceeds fleet.num_devices = {n}")
        self.edge = setup.aggregator == "edge"
        self.link = "lan" if self.edge else "wan"
        self.ranks = {l: setup.rank for l in range(L)}
        self.device_round_s = self._device_round_times()
        if settings.grouping_epsilon is not None and settings.grouping_input not in ("ldp", "pooled"):
            raise ConfigError(f"method.grouping_epsilon is set but method.grouping_input = \"{settings.grouping_input}\" "
                              "adds no noise; set grouping_input to \"ldp\" or \"pooled\", or unset grouping_epsilon.")
        if settings.grouping == "random" and settings.grouping_input != "histograms":
            raise ConfigError("method.grouping_input applies to grouping = \"near_iid\" only (random groups read no "
                              "input); unset grouping_input or use grouping = \"near_iid\".")
        self.grouping_privacy: dict[str, Any] = {}
        self.groups = self._group()
        self.bandits = [RUCB(len(self.arms), settings.exploration) for _ in self.groups]

    def _group(self) -> list[list[int]]:
        """The groups from the input `grouping_input` names (module docstring, "Private grouping");
        sets `grouping_privacy`, what grouping.json says about the input."""
        s, su = self.s, self.setup
        n, args = su.num_devices, (self.device_round_s, s.num_groups, s.grouping_lambda, s.size_slack, su.seed,
                                   s.grouping_passes)
        if s.grouping == "random":
            return random_groups(n, s.num_groups, su.seed)
        self.grouping_privacy = {"input": s.grouping_input, "epsilon": s.grouping_epsilon,
                                 "epsilon_meaning": _EPSILON_MEANING[s.grouping_input]}
        if s.grouping_input == "ldp":
            return group_devices(ldp_histograms(su.label_hists, s.grouping_epsilon, su.seed), *args)
        if s.grouping_input == "pooled":
            if size_bounds(n, s.num_groups, s.size_slack)[0] < 2:
                raise ConfigError(f"method.grouping_input = \"pooled\" sums at least 2 devices per group, but "
                                  f"{n} devices in method.num_groups = {s.num_groups} groups allow groups of 1; "
                                  "lower num_groups or size_slack.")
            res = pooled_grouping(su.label_hists, *args, epsilon=s.grouping_epsilon)
            self.grouping_privacy.update(releases=res.releases, epsilon_spent=res.epsilon_spent,
                                         objective_trace=res.objective_trace)
            return res.groups
        if s.grouping_input == "embeddings":
            if su.device_embeddings is None:
                raise ConfigError("method.grouping_input = \"embeddings\" needs the devices' embeddings, which this "
                                  "run's set-up does not provide; use grouping_input = \"histograms\".")
            sketches = random_projection(su.device_embeddings(), s.sketch_dim, su.seed)
            self.grouping_privacy["sketch_dim"] = s.sketch_dim
            return group_by(sketch_statistic(sketches, su.num_examples), *args)
        return group_devices(su.label_hists, *args)

    def _device_round_times(self) -> list[float]:
        """Per device: predicted full-depth intra-group round (E steps + whole model down/up on the group link)."""
        su, L = self.setup, self.L
        full = su.payload_bytes(self.ranks)
        return [float(su.predict_compute_s(i, L) + su.predict_transfer_s(i, full, full, self.link))
                for i in range(su.num_devices)]

    def global_ranks(self) -> dict[int, int]:
        return dict(self.ranks)

    def lowest_trainable_layer(self) -> int:
        return self.L - max(d for d, _ in self.arms)

    def grouping(self) -> dict[str, Any]:
        """The grouping report (written as grouping.json)."""
        rep = grouping_report(self.setup.label_hists, self.device_round_s, self.groups, self.s.grouping_lambda,
                              self.setup.seed)
        rep.update({"size_slack": self.s.size_slack, "aggregator": self.setup.aggregator,
                    "round_time": "predicted full-depth intra-group round: E local steps + model down/up on the group link"})
        if self.grouping_privacy:
            hists, su, s = self.setup.label_hists, self.setup, self.s
            exact = group_devices(hists, self.device_round_s, s.num_groups, s.grouping_lambda, s.size_slack, su.seed,
                                  s.grouping_passes)

            def kl_sum(groups: list[list[int]]) -> float:
                return float(sum(pooled_kl(hists, g) for g in groups))

            rep["private_grouping"] = {
                **self.grouping_privacy,
                "evaluation_only": "the kl_sum values are Σ_k KL(P_k‖P) measured with the TRUE label histograms, "
                                   "for evaluation; the grouping itself never read them",
                "kl_sum": kl_sum(self.groups), "exact_kl_sum": kl_sum(exact),
                "random_kl_sum": kl_sum(random_groups(su.num_devices, s.num_groups, su.seed))}
        return rep

    # -- one global round ---------------------------------------------------------------------
    def _choose(self, k: int, members: list[int], ctx: RoundContext, budget_s: float) -> tuple[int, float, bool]:
        """(arm, its predicted seconds, eligible?) for group k this round."""
        costs = [arm_cost(self.setup, members, ctx.profiles, d, t, self.link, self.edge) for d, t in self.arms]
        cap = self.s.traffic_budget_mb * 1e6 if self.s.traffic_budget_mb else float("inf")
        # a depth that does not fit the memory of a member (its smallest device) is never eligible
        fits = [all(self.setup.fits_memory(m, self.ranks, d, ctx.profiles[m]) for m in members)
                for d, _ in self.arms]
        ok = [sec <= budget_s * (1 + _REL_TOL) and b <= cap and f for (sec, b), f in zip(costs, fits)]
        if len(self.arms) == 1:  # both coordinates pinned: nothing to choose, the budget is only reported
            a = 0
        elif any(ok):
            a = self.bandits[k].select(ok, ctx.rng)
        else:  # nothing eligible: the fastest arm that fits memory (else the fastest; the engine refuses it)
            a = min(range(len(self.arms)), key=lambda j: (not fits[j], costs[j][0], j))
        return a, costs[a][0], ok[a]

    def _group_rounds(self, state: State, runs: list[tuple[int, list[int], int, int]],
                      ctx: RoundContext) -> dict[int, tuple[State, list[TrainResult], float]]:
        """τ_k intra-group rounds of FedAvg at each group's aggregator, for every (k, members,
        depth, τ) in `runs`; {k: (group model, results, seconds)}. The groups are independent, so
        intra-group round s of every group still training goes to the devices as one batch of
        jobs (the simulator's workers share it out), and each group then aggregates its own."""
        bpp = self.setup.bytes_per_param
        out: dict[int, list] = {}
        for k, _, _, _ in runs:
            seconds = ctx.transfer(0, num_bytes(state, bpp), "wan", EDGE_AGGREGATOR) if self.edge else 0.0
            out[k] = [state, [], seconds]  # PS -> edge aggregator: the whole global model
        live = {k for k, _, _, _ in runs}
        for s in range(max((tau for _, _, _, tau in runs), default=0)):
            jobs, group_of = [], {}
            for k, members, depth, tau in runs:
                if k in live and s < tau:
                    layers = tuple(range(self.L - depth, self.L))
                    for i in members:
                        plan = DevicePlan(i, self.ranks, layers, self.setup.local_steps, self.link,
                                          "all" if s == 0 else "trained")
                        jobs.append(Job(plan, out[k][0], aggregator=k))
                        group_of[i] = k
            if not jobs:
                break
            exchange = ctx.train(jobs)
            for k in sorted(set(group_of.values())):
                # the group's aggregator waits for its last member's update, or for a missing one
                out[k][2] += exchange.time_s([i for i, g in group_of.items() if g == k])
                mine = [r for r in exchange.results if group_of[r.device] == k]
                if not mine:  # no member's update arrived (dropped out or past the deadline): the group stops
                    live.discard(k)
                    continue
                # x <- sum_i n_i x_i / sum_i n_i over the trained layers + head; lower layers keep the global value
                if exchange.sums is not None:  # secure aggregation: the group's aggregator holds only the sum
                    out[k][0] = exchange.sums[k].apply(out[k][0])
                else:
                    out[k][0] = slot_average(out[k][0], [r.update for r in mine], [r.num_examples for r in mine])
                    out[k][0] = ctx.release(out[k][0], mine)  # central DP: the group aggregator's noise
                out[k][1] += mine
        for k, _, depth, _ in runs:
            gstate, results, _ = out[k]
            if self.edge and results:  # edge aggregator -> PS: trained layers + head
                sent = _trained_part(gstate, range(self.L - depth, self.L))
                out[k][2] += ctx.transfer(num_bytes(sent, bpp), 0, "wan", EDGE_AGGREGATOR)
        return {k: (g, r, float(sec)) for k, (g, r, sec) in out.items()}

    def run_round(self, rnd: int, state: State, ctx: RoundContext) -> tuple[State, RoundReport]:
        before = ctx.validate(state)
        info, runs, chosen = self._choose_arms(ctx)
        done = self._group_rounds(state, runs, ctx)
        updates, weights, all_results, times = [], [], [], []
        for k, _, depth, _ in runs:
            gstate, results, seconds = done[k]
            info[k]["time_s"] = seconds
            times.append(seconds)
            if results:
                sizes = {r.device: r.num_examples for r in results}  # each member once, whatever τ
                updates.append(_trained_part(gstate, range(self.L - depth, self.L)))
                weights.append(sum(sizes.values()))
                all_results += results
                self._reward(k, chosen[k], before, ctx.validate(gstate), seconds, len(sizes), info[k])
        extra = {"val_loss_start": before.loss, "groups": info}
        if not updates:  # nobody reported: the model stays, the round still took the waiting time
            return state, RoundReport(max(times, default=0.0), float("nan"), [], extra)
        return layerwise_aggregate(state, updates, weights), RoundReport(
            sim_time_s=max(times),
            train_loss=weighted_loss(all_results),
            participants=sorted({r.device for r in all_results}),
            extra=extra,
        )

    def _choose_arms(self, ctx: RoundContext) -> tuple[list[dict[str, Any]], list[tuple[int, list[int], int, int]], dict[int, int]]:
        """Each group's arm for this round: (metrics row per group, (k, available members, depth, τ)
        of each group that plays, arm index by group)."""
        avail = set(ctx.available)
        if self.s.round_budget_s is not None:
            fleet_budget = self.s.round_budget_s
        elif self.s.budget_scope == "round" and avail:
            fleet_budget = self.s.budget_factor * fedlora_round_s(self.setup, sorted(avail), ctx.profiles)
        else:
            fleet_budget = None
        info, runs, chosen = [], [], {}
        for k, group in enumerate(self.groups):
            members = [i for i in group if i in avail]
            row: dict[str, Any] = {"group": k, "depth": None, "tau": None, "time_s": 0.0, "reward": None,
                                   "participants": 0}
            info.append(row)
            if not members:
                continue
            budget = fleet_budget if fleet_budget is not None else \
                self.s.budget_factor * fedlora_round_s(self.setup, members, ctx.profiles)
            arm, predicted, eligible = self._choose(k, members, ctx, budget)
            depth, tau = self.arms[arm]
            runs.append((k, members, depth, tau))
            chosen[k] = arm
            row.update({"depth": depth, "tau": tau, "predicted_s": predicted, "budget_s": budget, "eligible": eligible})
        return info, runs, chosen

    def _reward(self, k: int, arm: int, before: Scores, after: Scores, seconds: float,
                reported: int, row: dict[str, Any]) -> None:
        """Feed group k's bandit the gain of its group model per simulated second; record it in `row`."""
        row.update({"val_loss": after.loss, "val_acc": after.acc, "participants": reported})
        if after.macro_f1 is not None:
            row["val_macro_f1"] = after.macro_f1
        if seconds > 0:
            metric = "loss" if self.s.reward == "loss" else self.setup.metric
            r = float(reward_of(before, after, seconds, metric))
            self.bandits[k].update(arm, r)
            row["reward"] = r

    # -- persistence and outputs ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"groups": [list(g) for g in self.groups], "arms": [list(a) for a in self.arms],
                "bandits": [b.state_dict() for b in self.bandits]}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if [tuple(a) for a in d["arms"]] != self.arms:
            raise CheckpointError("checkpoint's HierFedLoRA arms differ from this configuration's")
        self.groups = [[int(i) for i in g] for g in d["groups"]]
        self.bandits = [RUCB(len(self.arms), self.s.exploration) for _ in self.groups]
        for b, bd in zip(self.bandits, d["bandits"]):
            b.load_state_dict(bd)

    def write_outputs(self, out_dir: str | Path, rows: list[dict[str, Any]]) -> None:
        """grouping.json (the grouping report) and arms.png (chosen depth and τ per group over rounds)."""
        out = Path(out_dir)
        (out / "grouping.json").write_text(json.dumps(self.grouping(), indent=2))
        plot_arms(rows, out / "arms.png", len(self.groups))

    @staticmethod
    def report_figures(rows: list[dict[str, Any]], out_dir: Path, label: str) -> list[str]:
        """The arms plot of a run (groups counted from its rows)."""
        groups = [g["group"] for row in rows for g in row.get("groups", [])]
        if not groups:
            return []
        name = f"arms_{label}.png"
        plot_arms(rows, Path(out_dir) / name, 1 + max(groups))
        return [name]


def _trained_part(state: State, layers) -> State:
    """The head and the LoRA of `layers`: what a group reports to the PS."""
    return {key: state[key] for key in head_and_layers(state, layers)}


def plot_arms(rows: list[dict[str, Any]], path: str | Path, num_groups: int) -> None:
    """Two panels over global rounds: the depth d_k and the frequency τ_k each group played."""
    import hierfedlora.plots  # noqa: F401 - selects the headless backend
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    seen: dict[str, set[int]] = {"depth": set(), "tau": set()}
    for k in range(num_groups):
        pts = [(r["round"], g) for r in rows for g in r.get("groups", []) if g["group"] == k and g["depth"] is not None]
        xs = [p[0] for p in pts]
        off = (k - (num_groups - 1) / 2) * 0.06  # small vertical offset so overlapping groups stay visible
        for ax, key in zip(axes, ("depth", "tau")):
            seen[key].update(g[key] for _, g in pts)
            ax.plot(xs, [g[key] + off for _, g in pts], marker="o", ms=3, lw=1, drawstyle="steps-mid", label=f"group {k}")
    for ax, key, label in zip(axes, ("depth", "tau"), ("depth d (top layers)", "frequency τ")):
        ax.set_ylabel(label)
        ax.set_yticks(sorted(seen[key]))
        ax.grid(alpha=0.3)
    axes[1].set_xlabel("global round")
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[0].set_title("arms chosen by each group's R-UCB bandit")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
