"""Causal-LM simulation speed, side by side: our engine against a plain PEFT loop (docs/benchmarks.md).

The reference is federated instruction tuning written the usual way: one PEFT CAUSAL_LM model; for
each device, load the global adapter, pad each batch to its longest example, compute the full
logits and transformers' own masked causal-LM loss (`labels` with -100 on the prompt), train the
local steps with AdamW, hand the adapter back; FedAvg; then evaluate the usual way: the response
loss from a forward with `labels`, each allowed answer's log-likelihood from a full forward of
(prompt, answer), and greedy generation with `generate` for exact match. It uses the engine's
batches and seeds, so both paths must end with the same adapter and scores; the benchmark checks
that, then reports how much faster the engine is.

Workloads (SmolLM2-135M-Instruct, rotten_tomatoes in instruction form, 10 devices, 2 rounds of 4
local steps of batch 8, one evaluation of 100 test examples per round): L1 = every device trains all
30 layers (FedLoRA), L2 = every device trains the top 4 (`fedlora_topk`, depth 4). Rounds of the two
paths alternate, so machine noise hits both. The last line reads `L1 speedup=<x> L2 speedup=<y>`.

    python benchmarks/speed_llm.py            # the full benchmark
    python benchmarks/speed_llm.py --quick    # 4 devices, 2 steps, 32 test examples
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from hierfedlora import instruct
from hierfedlora.clock import step_flops
from hierfedlora.config import build_config
from hierfedlora.device import instruct_eval
from hierfedlora.device.model import find_layers, load_base
from hierfedlora.device.train import sample_batches, torch_seed
from hierfedlora.engine import Simulation
from hierfedlora.lora_state import State, parse_key


def config(method: dict, quick: bool):
    devices, steps, test = (4, 2, 32) if quick else (10, 4, 100)
    return build_config({  # everything the comparison depends on is pinned here, not left to defaults
        "task": {"kind": "instruction", "max_new_tokens": 8},
        "run": {"seed": 0, "rounds": 2, "eval_every": 1, "progress": False},
        "model": {"name": "smollm2", "max_length": 96, "rank": 8, "alpha": 16.0, "lora_dropout": 0.0,
                  "target_modules": ["q_proj", "v_proj"]},
        "data": {"name": "rotten_tomatoes", "max_examples": 1000, "max_test_examples": test, "val_fraction": 0.0},
        "partition": {"kind": "dirichlet_device", "alpha": 0.5},
        "fleet": {"num_devices": devices, "participation": 1.0, "dropout": 0.0},
        "train": {"local_steps": steps, "batch_size": 8, "lr": 1e-3, "weight_decay": 0.0, "eval_batch_size": 32,
                  "workers": 1, "lockstep": 1},
        "method": method,
    })


class Reference:
    """Federated instruction tuning the usual way (module docstring); our key format, to compare."""

    def __init__(self, sim: Simulation):
        from peft import LoraConfig, TaskType, get_peft_model

        cfg, w = sim.cfg, sim.work
        self.cfg, self.work, self.tok = cfg, w, sim.tokenizer
        self.layers = sorted(l for l, r in sim.global_ranks.items() if r > 0)
        base = load_base(cfg.model.name, 0, sim.tokenizer, cfg.run.seed, task="instruction")
        self.layer_path, _ = find_layers(base)
        self.model = get_peft_model(base, LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=cfg.model.rank, lora_alpha=cfg.model.alpha, lora_dropout=0.0,
            target_modules=cfg.model.target_modules, layers_to_transform=self.layers))
        self.state = {k: v.clone() for k, v in sim.state.items()}
        self.flops = 0.0

    def _peft_dict(self, state: State) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in state.items():
            layer, sub, ab = parse_key(k)
            out[f"base_model.model.{self.layer_path}.{layer}.{sub}.lora_{ab}.weight"] = v
        return out

    def _state(self) -> State:
        from peft import get_peft_model_state_dict

        sd = get_peft_model_state_dict(self.model)
        back = self._peft_dict({k: k for k in self.state})
        return {back[k]: v.detach().clone() for k, v in sd.items()}

    def train_round(self, rnd: int) -> None:
        from peft import set_peft_model_state_dict

        cfg, w, seed = self.cfg, self.work, self.cfg.run.seed
        updates, sizes = [], []
        for d in range(cfg.fleet.num_devices):
            set_peft_model_state_dict(self.model, self._peft_dict(self.state))
            self.model.train()
            opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                    lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
            torch.manual_seed(torch_seed((seed, 5005, rnd, d, 0)))
            for pick in sample_batches(w.parts[d], cfg.train.local_steps, cfg.train.batch_size, (seed, 4004, rnd, d, 0)):
                b = instruct.collate([w.ids[i] for i in pick], w.prompt_lens[pick], w.pad_id)
                loss = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
            updates.append(self._state())
            sizes.append(len(w.parts[d]))
        total = sum(sizes)
        self.state = {k: sum(u[k] * (n / total) for u, n in zip(updates, sizes)) for k in self.state}  # FedAvg

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        from peft import set_peft_model_state_dict
        from transformers import GenerationConfig

        set_peft_model_state_dict(self.model, self._peft_dict(self.state))
        self.model.eval()
        w, tok, bs = self.work, self.tok, self.cfg.train.eval_batch_size
        test = np.array(sorted(w.test.tolist(), key=lambda i: len(w.ids[i])))
        eot = instruct.end_of_turn(tok)
        loss_sum = n_tok = 0.0
        ll = np.zeros((len(test), len(w.answers)))
        texts = []
        gen = GenerationConfig(max_new_tokens=min(self.cfg.task.max_new_tokens, max(len(a) for a in w.answers)),
                               do_sample=False, eos_token_id=eot, pad_token_id=tok.pad_token_id)
        for s in range(0, len(test), bs):
            chunk = test[s:s + bs]
            b = instruct.collate([w.ids[i] for i in chunk], w.prompt_lens[chunk], w.pad_id)
            k = int((b["labels"][:, 1:] != instruct.IGNORE).sum())
            loss_sum += float(self.model(**b).loss) * k
            n_tok += k
            prompts = [w.ids[i][:w.prompt_lens[i]] for i in chunk]
            for j, a in enumerate(w.answers):  # each answer after each prompt, a full forward
                seqs = [np.concatenate([p, np.asarray(a, dtype=p.dtype)]) for p in prompts]
                bb = instruct.collate(seqs, np.array([len(p) for p in prompts]), w.pad_id)
                logp = torch.log_softmax(self.model(input_ids=bb["input_ids"], attention_mask=bb["attention_mask"])
                                         .logits[:, :-1].float(), -1)
                tgt = bb["labels"][:, 1:]
                m = tgt != instruct.IGNORE
                ll[s:s + len(chunk), j] = (logp.gather(2, tgt.clamp(min=0)[..., None])[..., 0] * m).sum(1).double().numpy()
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), w.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(prompts):
                ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
                mask[i, width - len(p):] = 1
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)[:, width:].tolist()
            texts += tok.batch_decode([r[:r.index(eot)] if eot in r else r for r in out], skip_special_tokens=True)
        refs = [w.responses[i] for i in test]
        norm = lambda t: " ".join(t.strip().lower().split())  # noqa: E731
        return {"loss": loss_sum / n_tok, "acc": float(np.mean(ll.argmax(1) == w.labels[test])),
                "exact_match": float(np.mean([norm(a) == norm(b) for a, b in zip(texts, refs)]))}


def arithmetic_limit(sim: Simulation, depth: int) -> float:
    """Training FLOPs of the reference over the engine's, counted from the real batches: the
    reference runs every layer over padded batches with full logits; the engine runs the LM head
    at the loss positions only, a prompt prefix the batch's rows share once, and the layers below
    its cache once per example (the fill, counted at each example's first use). What skipping work
    alone could give training, at equal FLOP/s."""
    from hierfedlora.device import shared_prefix

    cfg, w, cost, L = sim.cfg, sim.work, sim.model.cost, sim.model.num_layers
    k = sim.cached_layers
    ref = eng = 0.0
    for d in range(cfg.fleet.num_devices):
        seen: set[int] = set()
        for rnd in range(1, cfg.run.rounds + 1):
            picks = list(sample_batches(w.parts[d], cfg.train.local_steps, cfg.train.batch_size,
                                        (cfg.run.seed, 4004, rnd, d, 0)))
            new = sorted({int(i) for pick in picks for i in pick} - seen)
            seen.update(new)
            if k and new:  # the fill: the new examples' own tokens, their shared prefix once
                n = shared_prefix.common_prompt_length([w.ids[i] for i in new])
                eng += sum(cost.layer_fwd_flops(len(w.ids[i]) - n) for i in new) * k + cost.layer_fwd_flops(n) * k
            for pick in picks:
                lens = [len(w.ids[i]) for i in pick]
                width = max(lens)
                resp = int(sum(len(w.ids[i]) - w.prompt_lens[i] for i in pick))
                ref += step_flops(cost, [width] * len(pick), L, depth, 1.0, 0) + cost.head_flops(width * len(pick)) * 2
                n = shared_prefix.common_prompt_length([w.ids[i] for i in pick])
                own = [x - n for x in lens] + ([n] if n else [])
                eng += step_flops(cost, own, L - k, depth, 1.0, resp)
    return ref / eng


def run_workload(name: str, method: dict, depth: int, args) -> dict:
    cfg = config(method, args.quick)
    sim = Simulation(cfg)
    ref = Reference(sim)
    start = {k: v.clone() for k, v in sim.state.items()}
    t_eng = t_ref = e_eng = e_ref = 0.0
    measured = instruct_eval.metrics

    def timed_metrics(*a, **kw):  # the engine's evaluation time, apart from its training
        nonlocal e_eng
        t = time.perf_counter()
        try:
            return measured(*a, **kw)
        finally:
            e_eng += time.perf_counter() - t

    instruct_eval.metrics = timed_metrics
    for rnd in range(1, cfg.run.rounds + 1):  # alternate the paths round by round
        for path in (("engine", "reference") if rnd % 2 else ("reference", "engine")):
            t = time.perf_counter()
            if path == "engine":
                row = sim.step()  # trains and evaluates (eval_every = 1)
                t_eng += time.perf_counter() - t
            else:
                ref.train_round(rnd)
                t1 = time.perf_counter()
                r = ref.evaluate()
                e_ref += time.perf_counter() - t1
                t_ref += time.perf_counter() - t
        print(f"  {name} round {rnd}: engine acc {row['test_acc']:.4f} em {row['test_exact_match']:.4f} loss "
              f"{row['test_loss']:.5f} | reference acc {r['acc']:.4f} em {r['exact_match']:.4f} loss {r['loss']:.5f}",
              flush=True)
    # same result: the update agrees to float noise (Adam scales summation-order noise up to ~1e-4 of it)
    err = sum(float((sim.state[k] - ref.state[k]).norm()) ** 2 for k in start) ** 0.5
    upd = sum(float((ref.state[k] - start[k]).norm()) ** 2 for k in start) ** 0.5
    rel = err / upd
    n = len(sim.work.test)
    same = (rel <= 2e-3 and abs(row["test_acc"] - r["acc"]) <= 1.0 / n + 1e-12
            and abs(row["test_exact_match"] - r["exact_match"]) <= 1.0 / n + 1e-12
            and abs(row["test_loss"] - r["loss"]) <= 1e-4 * r["loss"])
    instruct_eval.metrics = measured
    limit = arithmetic_limit(sim, depth)
    print(f"  {name}: engine {t_eng:.1f} s, reference {t_ref:.1f} s, speedup {t_ref / t_eng:.2f}x; layers below "
          f"{sim.cached_layers} cached")
    print(f"  {name}: training {t_eng - e_eng:.1f} s vs {t_ref - e_ref:.1f} s ({(t_ref - e_ref) / (t_eng - e_eng):.2f}x, "
          f"arithmetic limit {limit:.2f}x), evaluation {e_eng:.1f} s vs {e_ref:.1f} s ({e_ref / e_eng:.2f}x)")
    print(f"  {name}: final adapter |engine - reference| / |update| = {rel:.1e}, test acc {row['test_acc']:.4f} vs "
          f"{r['acc']:.4f}, loss {row['test_loss']:.6f} vs {r['loss']:.6f}: {'SAME' if same else 'DIFFERENT'}", flush=True)
    return {"speedup": t_ref / t_eng, "same": same}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--workloads", default="L1,L2")
    args = p.parse_args()
    work = {"L1": ({"name": "fedlora"}, 30), "L2": ({"name": "fedlora_topk", "depth": 4}, 4)}
    res = {}
    for name in args.workloads.split(","):
        method, depth = work[name]
        res[name] = run_workload(name, method, depth, args)
    print(f"results identical: {'yes' if all(r['same'] for r in res.values()) else 'NO'}")
    print(" ".join(f"{k} speedup={v['speedup']:.2f}" for k, v in res.items()))
    return 0 if all(r["same"] for r in res.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
