"""Running a model outside training: ONNX export with verification, timing (whole models,
single blocks, per layer), the bench and its plots."""
