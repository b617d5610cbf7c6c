"""scGPT training in PyTorch: the model, pretraining, fine-tuning, official checkpoints.

Importing the package does not import torch: `scgpt_train.metrics` serves torch-free code too.
"""
