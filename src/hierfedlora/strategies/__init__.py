"""Federated fine-tuning methods, one module each (see `base` for the interface)."""
