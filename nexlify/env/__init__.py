"""The batched trading environment, its market tensors and its risk rules."""
