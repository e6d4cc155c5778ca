"""End-to-end runs (`make demo`, `make experiment`): start the server, drive the client, write
the results.

The only package that imports both sides: the server (`vllm_activations`, to start vLLM and
the sidecar and to build the embedded models) and the client (`actclient`). Neither of those
imports this package or each other (`tests/test_boundaries.py`).
"""
