"""hierfedlora: resource-efficient federated LoRA fine-tuning on heterogeneous devices (design.md §1)."""

__version__ = "0.1.0"
