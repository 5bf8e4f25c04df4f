"""Rewrites other than factorization: VGNet fixed kernels and CondConv upcycling."""
