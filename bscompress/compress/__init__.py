"""Decomposition: statistics, data-aware fits, the budget allocation, the latency guard,
sequential statistics, BatchNorm correction, sensitivity and block reconstruction."""
