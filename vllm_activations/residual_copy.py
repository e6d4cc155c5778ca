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


def record_rows(
    positions: torch.Tensor,
    slot_mapping: torch.Tensor | None,
    row_positions: torch.Tensor,
    row_slots: torch.Tensor,
) -> None:
    """Write down, for each row of this forward batch, its absolute position and KV slot.

    The connector attributes buffer rows to requests from these two columns after the forward,
    so it needs no forward context then (Model Runner V2 closes it before `wait_for_save`).
    Rows past the batch (and every slot when there is no slot mapping, e.g. a profiling run)
    become -1, which owns nothing. Fixed shapes and no host sync: graph-safe.
    """
    n = positions.shape[0]
    row_positions[:n].copy_(positions)
    row_positions[n:].fill_(-1)
    if slot_mapping is None:
        row_slots.fill_(-1)
        return
    k = min(n, slot_mapping.shape[0])
    row_slots[:k].copy_(slot_mapping[:k])
    row_slots[k:].fill_(-1)


def accumulate_channels(
    x: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_owner: torch.Tensor,
    block_size: int,
    sums: torch.Tensor,
    sum_sqs: torch.Tensor,
    counts: torch.Tensor | None = None,
    last: torch.Tensor | None = None,
    abs_sums: torch.Tensor | None = None,
) -> None:
    """Add each token's channels into the statistics slot of the request that owns it.

    x: [n, C] activations of this forward's n (padded) tokens. slot_mapping: [>= n] KV-cache
    slot per token, -1 for padding. block_owner: [num_blocks + 1] statistics slot per KV block;
    its last entry (and every block of a request that records no statistics) is the trash slot.
    sums, sum_sqs: [num_slots + 1, C] float32; counts: [num_slots + 1] int64, or None.
    last: [num_slots + 1, C] float32, or None: each slot's most recent token (the one a decode
    step adds), so a token forwarded after the request's end (async scheduling's extra step
    after an EOS) can be taken out again. abs_sums: [num_slots + 1, C] float32 sums of |x|
    (Minitron's mean-|x| importance), or None. Fixed shapes and no host sync: graph-safe.
    """
    n = x.shape[0]
    slots = slot_mapping[:n]
    trash_block = block_owner.shape[0] - 1
    blocks = torch.div(slots, block_size, rounding_mode="floor")
    block = torch.where(slots >= 0, blocks, trash_block)
    owner = block_owner[block]
    xf = x.float()
    sums.index_add_(0, owner, xf)
    sum_sqs.index_add_(0, owner, xf * xf)
    if counts is not None:
        counts.index_add_(0, owner, torch.ones_like(owner))
    if last is not None:
        last.index_copy_(0, owner, xf)
    if abs_sums is not None:
        abs_sums.index_add_(0, owner, xf.abs())
