"""The contract between the server and the client: the capture spec (`spec`), the shard format,
its reader and writer (`shard`), durable file publication (`files`) and the special-token rule
both sides apply (`tokens`).

It imports nothing of either side (no vllm, no torch, no `actclient`), so the server
(`vllm_activations.*`, the vLLM plugin and the sidecar) and the client (`actclient`) both
import it, and nothing else crosses between them; `tests/test_boundaries.py` checks that.
"""
