"""Training: LLaDA pre-training and SFT on one CPU process or many GPUs under torchrun."""
