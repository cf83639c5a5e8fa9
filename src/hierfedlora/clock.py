"""Virtual clock and traffic meter (design.md §3).

A local step costs a forward pass through every layer plus a backward pass through the trained
layers only (the layers below get no backward); its FLOPs are counted from the real token lengths of
the batch and divided by the device's sustained FLOP/s. A transfer costs latency + bytes/bandwidth.
A group's round ends with its slowest member; a synchronous round ends when the last report lands,
or when its aggregator stops waiting for a device that dropped out or missed `fleet.deadline_s`
(`protocol.Exchange`, design.md §3 "Dropouts and the deadline").
Nothing here reads the host's clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hierfedlora.fleet import DeviceProfile


@dataclass(frozen=True)
class ModelCost:
    """FLOP model of one transformer layer, from the model config."""

    hidden: int
    intermediate: int
    mlp_matrices: int = 2  # 3 for gated (Llama-style) MLPs
    kv_fraction: float = 1.0  # key/value width over hidden (grouped-query attention)
    lm_head: int = 0  # a causal LM's vocabulary (its LM head's rows); 0 for a classifier
    heads: int = 1  # attention heads (the attention matrices kept for backward)
    frozen_bytes: int = 0  # the base model's weights at their dtype (every device holds them all)

    def head_flops(self, tokens: int) -> float:
        """Forward FLOPs of the LM head at `tokens` positions: 2·V·h each."""
        return 2.0 * self.lm_head * self.hidden * tokens

    def layer_fwd_flops(self, seq_len: int) -> float:
        """Forward FLOPs of one layer for one sequence of `seq_len` tokens.

        2·n·(h²·(2 + 2·kv) + m·h·i) for the projections and MLP, + 4·n²·h for QKᵀ and AV.
        """
        h, n = self.hidden, seq_len
        proj = h * h * (2 + 2 * self.kv_fraction) + self.mlp_matrices * h * self.intermediate
        return 2.0 * n * proj + 4.0 * n * n * h


def step_flops(cost: ModelCost, seq_lens: list[int], num_layers: int, trained_layers: int, backward_ratio: float,
               head_tokens: int = 0) -> float:
    """FLOPs of one local step: forward through all layers + backward through the trained ones; for
    a causal LM also its LM head at the `head_tokens` positions where the loss is computed, forward
    and backward (the gradient flows through the frozen head into the trained layers)."""
    per_layer = sum(cost.layer_fwd_flops(n) for n in seq_lens)
    head = cost.head_flops(head_tokens) * (1 + backward_ratio) if trained_layers else 0.0
    return per_layer * (num_layers + backward_ratio * trained_layers) + head


def compute_time(flops: float, profile: DeviceProfile) -> float:
    return flops / profile.flops


def transfer_time(nbytes: int, bandwidth_Bps: float, latency_s: float) -> float:
    """latency + bytes / bandwidth; a transfer of nothing costs nothing."""
    return 0.0 if nbytes <= 0 else latency_s + nbytes / bandwidth_Bps


@dataclass
class TrafficMeter:
    """Exact byte counts, split by direction and link class."""

    up: dict[str, int] = field(default_factory=lambda: {"wan": 0, "lan": 0})
    down: dict[str, int] = field(default_factory=lambda: {"wan": 0, "lan": 0})

    def add(self, link: str, up: int = 0, down: int = 0) -> None:
        self.up[link] += int(up)
        self.down[link] += int(down)

    @property
    def bytes_up(self) -> int:
        return sum(self.up.values())

    @property
    def bytes_down(self) -> int:
        return sum(self.down.values())

    def state_dict(self) -> dict:
        return {"up": dict(self.up), "down": dict(self.down)}

    def load_state_dict(self, d: dict) -> None:
        self.up, self.down = dict(d["up"]), dict(d["down"])


def train_memory_bytes(cost: ModelCost, lora_params: int, trained_params: int, trained_layers: int, batch: int,
                       seq_len: int, head_tokens: int = 0) -> float:
    """Estimated peak training memory of one device's plan, in bytes (design.md §4.2):

    frozen weights at their dtype + LoRA parameters applied (fp32) + for the trained ones their
    gradient and AdamW's two moments (3 × fp32) + activations kept for backward in the trained
    layers, s·b·(34·h + 5·a·s) bytes a layer at 16 bits (Korthikanti et al., 2022, "Reducing
    Activation Recomputation in Large Transformer Models"), doubled at 32 bits + a causal LM's
    logits and their gradient at the loss positions (2 × V × fp32 each). Layers below the lowest
    trained one run without gradients and keep nothing. An estimate: allocator slack and framework
    overhead are not counted.
    """
    weights = cost.frozen_bytes + 4 * lora_params + 12 * trained_params
    acts = trained_layers * 2 * seq_len * batch * (34 * cost.hidden + 5 * cost.heads * seq_len)
    logits = 8 * cost.lm_head * head_tokens
    return float(weights + acts + logits)
