"""``nn.Module`` blocks built from factors (``from_factors``), with ``to_dense()`` for tests."""
