"""Fine-tuning a compressed model (knowledge distillation, resumable, distributed)."""
