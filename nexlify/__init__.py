"""nexlify: the trainer. Markets, environments, agents; nothing of pipelines or clusters."""

__version__ = "0.1.0"
