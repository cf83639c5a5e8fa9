"""Device jobs in this process, one after another, on one shared model (`protocol.Executor`).

The simplest executor: what a fleet of devices would compute, computed here in turn. Faster ones
(`fast.joined.JoinedExecutor`, `fast.workers.ProcessExecutor`) give the same outputs.
"""

from __future__ import annotations

import torch

from hierfedlora.device.model import LocalModel
from hierfedlora.device.train import FleetData, evaluate, run_job
from hierfedlora.lora_state import State
from hierfedlora.protocol import DeviceJob, ExecutorBase, JobOutput, LocalTraining, Scores


class LocalExecutor(ExecutorBase):
    """Runs each job with `run_job` on `model`, reading every device's data from `data`."""

    def __init__(self, model: LocalModel, data: FleetData, settings: LocalTraining):
        self.model, self.data, self.settings = model, data, settings

    def run(self, rnd: int, jobs: list[DeviceJob]) -> list[JobOutput | None]:
        return [run_job(self.model, self.data.device(j.plan.device), j, rnd, self.settings) for j in jobs]

    def evaluate(self, payload: State, ranks: dict[int, int], batches: list[dict[str, torch.Tensor]]) -> Scores:
        self.model.load(payload, ranks, ())
        return evaluate(self.model, batches)

    def close(self) -> None:
        pass
