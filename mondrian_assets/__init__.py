"""Turn the Mondrian app's job history into LoRA-fine-tuned Qwen3-VL advisors."""
