"""actclient: the laptop side of vllm-activations.

Builds the Phase 1 tour-stop dataset, drives it through a vllm-activations server, and turns
the recorded shards into an analysis and a pruning plan. Imports without vllm or torch.
"""

__version__ = "0.1.0"
