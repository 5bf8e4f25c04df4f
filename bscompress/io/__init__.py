"""Reading and writing models: architecture specs (``arch``), checkpoint files
(``checkpoint``), the MODEL argument and bscompress archives (``archive``), and which
architectures an archive may name (``trust``). Import from the modules: the package
re-exports nothing, so that reading a checkpoint does not load the method stack."""
