"""Causal-LM instruction tuning end to end on a tiny Llama: every method runs with no method code
change, the run learns the synthetic task, a resumed run equals an uninterrupted one, and the
exported adapter is a PEFT CAUSAL_LM adapter that generates what the run's evaluation generated."""

import json

import pytest
import torch

from hierfedlora import instruct
from hierfedlora.adapter import load_adapter
from hierfedlora.cli import main
from hierfedlora.device import instruct_eval
from hierfedlora.engine import Simulation
from hierfedlora.experiment import run_experiment
from hierfedlora.lora_state import to_device

METHODS = {
    "fedlora": {},
    "hetlora": {},
    "flexlora": {},
    "legend": {},
    "hierfedlora": {"method.num_groups": 2, "method.taus": [1, 2]},
    "fedlora_topk": {},
}


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_causal_lm(tiny_llm_cfg, method):
    cfg = tiny_llm_cfg(**{"method.name": method, "run.rounds": 2, "run.eval_every": 2, **METHODS[method]})
    sim = Simulation(cfg)
    out = sim.run()
    last = out[-1]
    assert {"test_loss", "test_ppl", "test_acc", "test_exact_match"} <= set(last)
    assert last["bytes_up"] > 0 and last["sim_time_s"] > 0 and sim.model.layout.head == {}
    assert last["test_loss"] < out[0]["test_loss"]  # trained on the responses: their loss falls


def test_causal_lm_run_learns_and_its_adapter_generates_the_same(tiny_llm_cfg, tmp_path):
    cfg = tiny_llm_cfg(**{"run.rounds": 6, "run.eval_every": 3, "train.local_steps": 4, "train.lr": 0.02})
    out = tmp_path / "r"
    summary = run_experiment(cfg, out, progress=False)
    first, last = rows(out / "metrics.jsonl")[0], rows(out / "metrics.jsonl")[-1]
    assert summary["score"] == "test_acc" and summary["zero_shot_score"] == first["test_acc"]
    # the random tiny decoder learns to answer in the allowed words (exact match from 0), not the task itself
    assert last["test_exact_match"] >= 0.4 > first["test_exact_match"] and last["test_loss"] < first["test_loss"] - 0.3
    conf = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert conf["task_type"] == "CAUSAL_LM" and conf["target_modules"]
    model, tok, _ = load_adapter(out / "adapter")
    sim = Simulation(cfg)
    sim.load_checkpoint(out / "checkpoint.pt")
    r = sim.global_ranks
    sim.model.load(to_device(sim.state, r, r), r, ())
    sim.model.eval_mode()
    ev = sim.test_batches
    eot = instruct.end_of_turn(tok)
    ours, _ = instruct_eval.greedy(sim.model, ev.prompts, 4, eot, tok.pad_token_id, 16)
    for p, want in zip(ev.prompts[:12], ours):
        x = torch.as_tensor(p, dtype=torch.long)[None]
        got = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False,
                             eos_token_id=eot, pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert (got[:got.index(eot)] if eot in got else got) == want


def test_generate_command(tiny_llm_cfg, tiny_cfg, tmp_path, capsys):
    cfg = tiny_llm_cfg(**{"run.rounds": 1})
    run_experiment(cfg, tmp_path / "r", progress=False)
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "r"), "--prompt", "Is this text positive or negative?\n\ngood film",
                 "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    model, tok, _ = load_adapter(tmp_path / "r" / "adapter")
    ids = tok(instruct.prompt_text(tok, "Is this text positive or negative?\n\ngood film"), add_special_tokens=False,
              return_tensors="pt")["input_ids"]
    want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                          eos_token_id=instruct.end_of_turn(tok), pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    assert printed == [tok.decode(want, skip_special_tokens=True).strip()]
    run_experiment(tiny_cfg(**{"run.rounds": 1}), tmp_path / "c", progress=False)
    assert main(["generate", str(tmp_path / "c"), "--prompt", "hi"]) == 2
    assert "is a classifier" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "nothing")]) == 2


def test_causal_lm_resume_equals_uninterrupted(tiny_llm_cfg, tmp_path, interrupted_run):
    cfg = tiny_llm_cfg(**{"run.rounds": 3, "run.eval_every": 1, "run.checkpoint_every": 1})
    run_experiment(cfg, tmp_path / "a", progress=False, export=False)
    interrupted_run(cfg, tmp_path / "b", after=2)
    assert main(["run", "--resume", str(tmp_path / "b"), "--quiet"]) == 0
    assert rows(tmp_path / "a" / "metrics.jsonl") == rows(tmp_path / "b" / "metrics.jsonl")


def test_open_answers_are_clustered_and_scored_by_rouge(tmp_path, tiny_llm_cfg):
    import pandas as pd

    f = tmp_path / "open.csv"
    words = "red green blue cyan pink gold gray teal".split()
    pd.DataFrame({"prompt": [f"name a colour like {words[i % 8]} number {i}" for i in range(120)],
                  "response": [f"{words[(i + 1) % 8]} {i % 7}" for i in range(120)]}).to_csv(f, index=False)
    cfg = tiny_llm_cfg(**{"data.name": str(f), "run.rounds": 1, "task.clusters": 3, "partition.kind": "dirichlet_device",
                          "partition.alpha": 0.5})
    sim = Simulation(cfg)
    assert sim.work.label_names == ["cluster0", "cluster1", "cluster2"] and sim.score_key == "test_rougeL"
    row = sim.run()[-1]
    assert 0.0 <= row["test_rougeL"] <= 1.0 and "test_acc" not in row
    assert sim.summary()["score"] == "test_rougeL"


def test_a_local_gpt2_folder_works_with_peft_default_targets(tiny_llm_cfg, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from hierfedlora.device.model import load_tokenizer

    tok = load_tokenizer("tiny-llama")  # MiniLM's tokenizer, saved beside the model
    folder = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=4, n_positions=128)).save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = tiny_llm_cfg(**{"model.name": str(folder), "run.rounds": 1, "run.eval_every": 1})
    run_experiment(cfg, tmp_path / "r", progress=False)
    conf = json.loads((tmp_path / "r" / "adapter" / "adapter_config.json").read_text())
    assert conf["task_type"] == "CAUSAL_LM" and all(m.endswith("attn.c_attn") for m in conf["target_modules"])
    assert len(conf["target_modules"]) == 3  # PEFT's GPT-2 default, in each of the 3 blocks
    model, _, _ = load_adapter(tmp_path / "r" / "adapter")
    assert model.can_generate()
