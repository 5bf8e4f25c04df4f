"""The bottom layer: errors and exit codes, output files, the Plan and its typed records,
MAC and parameter counts, progress steps, conv padding, layer surgery and the configuration
schema. Imports nothing else of bscompress."""
