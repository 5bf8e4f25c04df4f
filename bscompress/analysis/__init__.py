"""What a model holds: ``inspect`` (per-layer cost, eligibility, separability) and its kernels."""
