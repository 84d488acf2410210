"""Training data: Megatron .bin/.idx pretraining datasets, alpaca-style SFT samples, preprocessing, and the tiny
offline tokenizer and corpus used by tests and the demo."""
