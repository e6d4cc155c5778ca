"""Special token ids of a model's tokenizer, read from its files (no tokenizer library).

One definition for both sides: the analyzer excludes these ids from its `content` population,
and summary capture does the same on the device.
"""

from __future__ import annotations

import json
from pathlib import Path


def special_token_ids(model_dir: str | Path) -> set[int]:
    """Ids of special tokens from tokenizer_config.json / tokenizer.json (added, special)."""
    model_dir = Path(model_dir)
    ids: set[int] = set()
    config_path = model_dir / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        for key, meta in config.get("added_tokens_decoder", {}).items():
            if meta.get("special", True):
                ids.add(int(key))
    tokenizer_path = model_dir / "tokenizer.json"
    if tokenizer_path.is_file():
        tokenizer = json.loads(tokenizer_path.read_text())
        for meta in tokenizer.get("added_tokens", []):
            if meta.get("special", False):
                ids.add(int(meta["id"]))
    return ids


def special_token_ids_of(tokenizer: str) -> set[int]:
    """special_token_ids of a tokenizer given as a local folder or a Hugging Face id whose
    files are in the local cache (the server has loaded them already)."""
    path = Path(tokenizer)
    if path.is_dir():
        return special_token_ids(path)
    from huggingface_hub import snapshot_download

    folder = snapshot_download(
        tokenizer, allow_patterns=["tokenizer_config.json", "tokenizer.json"],
        local_files_only=True,
    )  # fmt: skip
    return special_token_ids(folder)
