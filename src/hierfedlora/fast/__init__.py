"""The speed machinery around the plain device runtime (`hierfedlora.device`), same results bit for
bit: the packed forward (`packed`) with dropout masks drawn where used (`masks`), the frozen-prefix
cache (`prefix_cache`), the model that uses them (`model`), devices joined in one batch (`joined`) and
device jobs in worker processes (`workers`). The plain runtime never imports this package."""
