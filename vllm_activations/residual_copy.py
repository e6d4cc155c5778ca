"""The body of the capture op, in torch alone.

Kept apart from capture.py (which needs vllm) so that bench/gpu_op_check.py can run this
exact function under CUDA graphs on a GPU machine that has torch but no vLLM.
"""

from __future__ import annotations

import torch


def copy_residuals(
    hidden_states: torch.Tensor, residual: torch.Tensor, buffer: torch.Tensor, slot: int
) -> None:
    """buffer[:n, slot] = residual (post-attention); buffer[:n, slot+1] = h + residual
    (post-MLP, rounded once to the buffer dtype as the fused add+RMSNorm kernel does)."""
    n = hidden_states.shape[0]
    buffer[:n, slot].copy_(residual)
    torch.add(hidden_states, residual, out=buffer[:n, slot + 1])


def copy_residuals_fake(
    hidden_states: torch.Tensor, residual: torch.Tensor, buffer: torch.Tensor, slot: int
) -> None:
    """Shape-only implementation for tracing: the op returns nothing."""
    return None
