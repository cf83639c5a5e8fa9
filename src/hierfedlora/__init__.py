"""hierfedlora: resource-efficient federated LoRA fine-tuning on heterogeneous devices (SPEC §1)."""

__version__ = "0.1.0"
