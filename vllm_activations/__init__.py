"""vllm-activations: record every decoder layer's residual stream inside vLLM, per request.

Server side (runs inside the vLLM image): the plugin (`plugin`), capture model classes and
custom op (`capture`, `models`), the KV connector that writes shards (`connector`), the launcher
(`cli`). Shared with the client, importable without vllm or torch: `spec` and `shard`.
"""

__version__ = "0.1.0"
