"""LoRA fine-tuning with MLX: config, examples, the model, checkpoints, the loop and its child process."""
