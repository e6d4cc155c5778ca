"""`vllm-activations selftest`: capture a few prompts on this machine and check the invariants
that catch faults a CPU test run cannot see (CUDA graphs, in-place fused kernels, batching).

It starts its own servers, one after the other (the default compiled / CUDA-graph mode, then
`--enforce-eager`), with the tensor-parallel size given, captures every layer, both sites and
the channel statistics of a few prompts, alone and all at once, and checks:

1. compiled == eager: the default mode's shards agree with eager mode's. CUDA graphs and
   Inductor fusions replay the capture op, so a copy recorded at the wrong point of a graph
   (e.g. after the next layer's in-place add+RMSNorm overwrote its input) shows up here.
2. layer chaining: each captured residual is the one the next block added to. The blocks are
   linear in what the channel statistics record, so over a request's tokens
       sum_t (post_attention[l] - post_mlp[l-1]) == W_o[l] @ sum_t o_proj_input[l]
       sum_t (post_mlp[l] - post_attention[l])   == W_down[l] @ sum_t down_proj_input[l]
   with post_mlp[-1] the token embeddings. The weights come from the checkpoint itself
   (block-scaled FP8 is dequantized), not from vLLM, so a residual that is stale, taken from
   another row, or not the one layer l+1 consumed fails it.
3. batch == solo: rows of requests run concurrently equal rows of the same requests run alone
   (no row is attributed to the wrong request or position).

Greedy generations may diverge between modes in low precision; shards are compared only on the
positions whose input tokens agree. Prints PASS/FAIL per check; exit status 1 if any fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from vllm_activations.openai_capture import capture_params, completion_body, wait_for_shard
from vllm_activations.process import ServerProcess
from vllm_activations.shard import Shard, ShardReader, read_shard
from vllm_activations.spec import CaptureSpec

PROMPTS = (
    "You are a tour guide. Introduce the old harbour of Marseille to a group of visitors, "
    "with its history, the fish market and the view from Notre-Dame de la Garde.",
    "Explain in three sentences why the Charles Bridge in Prague has thirty statues.",
    "Write a short welcome for travellers arriving at the main square of Kraków.",
    "List five facts about the Alhambra in Granada, one line each.",
    "Describe the walk from the Acropolis museum up to the Parthenon for someone who uses a cane.",
    "What should a first-time visitor know about the tides at Mont-Saint-Michel?",
)

# (min cosine for 99% of rows, min cosine for the worst row, max relative chain error)
TOLERANCES = {
    "float32": (0.99999, 0.9999, 1e-3),
    "bfloat16": (0.999, 0.99, 5e-2),
    "float16": (0.999, 0.99, 5e-2),
}
QUANTIZED_TOLERANCE = (0.99, 0.95, 0.15)


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name}: {self.detail}"


# ------------------------------------------------------------------ capturing


def _capture(server: ServerProcess, prompt: str, max_tokens: int, dtype: str) -> Path:
    body = completion_body(
        model="model",
        prompt=prompt,
        spec=CaptureSpec(dtype=dtype, channel_stats=True),
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=True,
    )
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=900)
    if r.status_code != 200:
        raise RuntimeError(f"capture failed: HTTP {r.status_code} {r.text[:500]}")
    return wait_for_shard(capture_params(r.json()), timeout=600)


def capture_prompts(
    server: ServerProcess, prompts: list[str], max_tokens: int, dtype: str, *, together: bool
) -> list[Path]:
    """Shards of `prompts`, sent one after another or all at once."""
    if not together:
        return [_capture(server, p, max_tokens, dtype) for p in prompts]
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: _capture(server, p, max_tokens, dtype), prompts))


# ------------------------------------------------------------------ comparing shards


def _common_positions(a: Shard, b: Shard) -> int:
    """Positions whose input tokens agree: the prompt plus the common prefix of outputs."""
    if a.input_tokens.tolist() != b.input_tokens.tolist():
        raise ValueError("the two shards have different prompts")
    same = 0
    for x, y in zip(a.output_tokens.tolist(), b.output_tokens.tolist(), strict=False):
        if x != y:
            break
        same += 1
    # Position P + j holds output token j-1 as input; position P-1 the last prompt token.
    return len(a.input_tokens) + same


def row_cosines(a: Shard, b: Shard) -> np.ndarray:
    """Cosine of every (site, layer, position) row the two shards share."""
    n = _common_positions(a, b)
    out = []
    for site in a.layer_outputs:
        x = a.layer_outputs[site][:, :n]
        y = b.layer_outputs[site][:, :n]
        num = (x * y).sum(-1)
        den = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
        out.append(np.where(den > 0, num / np.maximum(den, 1e-30), 1.0).ravel())
    return np.concatenate(out)


def compare(name: str, pairs: list[tuple[Path, Path]], tolerance: tuple) -> CheckResult:
    share_floor, worst_floor, _ = tolerance
    cosines = np.concatenate([row_cosines(read_shard(a), read_shard(b)) for a, b in pairs])
    share = float((cosines >= share_floor).mean())
    worst = float(cosines.min())
    ok = share >= 0.99 and worst >= worst_floor
    return CheckResult(
        name,
        ok,
        f"{len(cosines)} rows; {share:.2%} with cosine >= {share_floor} (need 99%), "
        f"worst {worst:.6f} (need >= {worst_floor})",
    )


# ------------------------------------------------------------------ layer chaining


class CheckpointWeights:
    """Dense float32 weights from a safetensors checkpoint (FP8 block-scaled dequantized)."""

    def __init__(self, model_dir: Path) -> None:
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: model_dir / f for name, f in weight_map.items()}
        else:
            from safetensors import safe_open

            path = model_dir / "model.safetensors"
            with safe_open(str(path), framework="pt") as f:
                self._files = dict.fromkeys(f.keys(), path)
        config = json.loads((model_dir / "config.json").read_text())
        quant = config.get("quantization_config") or {}
        self.quantization = quant.get("quant_method")
        self.block = quant.get("weight_block_size")

    def _raw(self, name: str):
        from safetensors import safe_open

        with safe_open(str(self._files[name]), framework="pt") as f:
            return f.get_tensor(name)

    def find(self, suffix: str) -> str:
        for name in self._files:
            if name.endswith(suffix):
                return name
        raise KeyError(suffix)

    def get(self, name: str):
        import torch

        weight = self._raw(name)
        if weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            base = name[: -len("weight")]
            scale_name = next(
                (base + s for s in ("weight_scale_inv", "weight_scale") if base + s in self._files),
                None,
            )
            if scale_name is None:
                raise ValueError(f"{name} is FP8 without a weight scale")
            scale = self._raw(scale_name).float()
            weight = weight.float()
            if scale.numel() == 1:
                return weight * scale
            if scale.dim() == 2 and self.block:
                rows, cols = self.block
                full = scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
                return weight * full[: weight.shape[0], : weight.shape[1]]
            return weight * scale.reshape(-1, 1)
        if not weight.is_floating_point():
            raise ValueError(f"{name}: quantization {self.quantization!r} is not supported")
        return weight.float()


def chain_errors(shard_path: Path, weights: CheckpointWeights) -> list[tuple[str, int, float]]:
    """(block, layer, relative error) of both linear identities for every layer."""
    import torch

    with ShardReader(shard_path) as reader:
        layers = reader.layers.tolist()
        if layers != list(range(len(layers))):
            raise ValueError("the chaining check needs every layer captured")
        post_attn = reader.read("post_attention")
        post_mlp = reader.read("post_mlp")
        tokens = np.concatenate([reader.dataset("input_tokens"), reader.dataset("output_tokens")])
        stats = {
            kind: reader.dataset(f"channel_stats/{kind}/sum")
            for kind in ("attn_heads", "mlp_intermediate")
        }
    positions = post_attn.shape[1]
    embed = weights.get(weights.find("embed_tokens.weight"))
    ids = torch.as_tensor(tokens[:positions].astype(np.int64))
    previous = embed.index_select(0, ids).sum(0).double()
    errors = []
    for layer in layers:
        attn_sum = torch.from_numpy(post_attn[layer].astype(np.float64)).sum(0)
        mlp_sum = torch.from_numpy(post_mlp[layer].astype(np.float64)).sum(0)
        for block, lhs, proj, kind in (
            ("attention", attn_sum - previous, "self_attn.o_proj", "attn_heads"),
            ("mlp", mlp_sum - attn_sum, "mlp.down_proj", "mlp_intermediate"),
        ):
            w = weights.get(weights.find(f"layers.{layer}.{proj}.weight")).double()
            rhs = w @ torch.from_numpy(stats[kind][layer].astype(np.float64))
            err = float(torch.linalg.vector_norm(lhs - rhs) / torch.linalg.vector_norm(rhs))
            errors.append((block, layer, err))
        previous = mlp_sum
    return errors


def chain_check(shards: list[Path], model_dir: Path, tolerance: tuple) -> CheckResult:
    name = "post_mlp[l] feeds layer l+1 (residual deltas == W_o / W_down x channel sums)"
    try:
        weights = CheckpointWeights(model_dir)
        errors = [e for path in shards for e in chain_errors(path, weights)]
    except (ValueError, KeyError, FileNotFoundError) as exc:
        return CheckResult(name, False, f"could not run: {exc}")
    worst = max(errors, key=lambda e: e[2])
    limit = tolerance[2]
    return CheckResult(
        name,
        worst[2] <= limit,
        f"{len(errors)} block sums; worst relative error {worst[2]:.2e} at layer {worst[1]} "
        f"{worst[0]} (need <= {limit:g})",
    )


# ------------------------------------------------------------------ driver


def local_model_dir(model: str) -> Path:
    """A local directory for `model` (a path, or a Hugging Face id already in the cache)."""
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors"]))


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.model is None:
        from vllm_activations import embedded

        model_dir = embedded.smollm2()
    else:
        model_dir = local_model_dir(args.model)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="selftest-"))
    prompts = list(PROMPTS[: args.prompts])
    serve_args = [
        "--served-model-name",
        "model",
        "--tensor-parallel-size",
        str(args.tensor_parallel_size),
        "--max-model-len",
        str(args.max_model_len),
        *extra,
    ]
    if args.dtype:
        serve_args += ["--dtype", args.dtype]
    results: list[CheckResult] = []
    try:
        shards: dict[str, list[Path]] = {}
        for mode, mode_args in (("compiled", []), ("eager", ["--enforce-eager"])):
            print(f"selftest: starting the {mode} server on {model_dir} ...", flush=True)
            server = ServerProcess(model_dir, workdir / mode, [*serve_args, *mode_args])
            try:
                server.wait_ready()
                dtype = _served_dtype(server)
                shards[f"{mode}-solo"] = capture_prompts(
                    server, prompts, args.max_tokens, dtype, together=False
                )
                if mode == "compiled":
                    shards["compiled-batch"] = capture_prompts(
                        server, prompts, args.max_tokens, dtype, together=True
                    )
            finally:
                server.stop()
        tolerance = TOLERANCES.get(dtype, TOLERANCES["bfloat16"])
        if CheckpointWeights(model_dir).quantization:
            tolerance = QUANTIZED_TOLERANCE
        results.append(
            compare(
                "compiled == eager",
                list(zip(shards["compiled-solo"], shards["eager-solo"], strict=True)),
                tolerance,
            )
        )
        results.append(chain_check(shards["compiled-solo"], model_dir, tolerance))
        results.append(
            compare(
                "batch == solo",
                list(zip(shards["compiled-batch"], shards["compiled-solo"], strict=True)),
                tolerance,
            )
        )
    except Exception as exc:  # noqa: BLE001 - a selftest reports, it does not crash
        results.append(CheckResult("servers and captures", False, str(exc)))
    print()
    for result in results:
        print(result.line())
    failed = [r for r in results if not r.passed]
    verdict = "FAIL" if failed else "PASS"
    print(f"\nselftest: {verdict} ({len(results) - len(failed)}/{len(results)} checks)")
    if failed or args.keep:
        print(f"selftest: shards and server logs kept in {workdir}")
    elif not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def _served_dtype(server: ServerProcess) -> str:
    """The engine's dtype, read back from a tiny capture's shard attributes."""
    path = _capture(server, "Hello", 1, "float32")
    with ShardReader(path) as reader:
        dtype = str(reader.attrs.get("model_dtype", "bfloat16"))
    return dtype if dtype in TOLERANCES else "bfloat16"


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    p = sub.add_parser(
        "selftest",
        help="capture a few prompts and check compiled == eager, layer chaining and "
        "batch == solo (run it on the GPU pod before a long recording); unknown arguments "
        "go to the servers",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="model directory or cached Hugging Face id (default: the embedded SmolLM2)",
    )
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--dtype", default=None, help="engine dtype (default: the model's)")
    p.add_argument("--prompts", type=int, default=4, help=f"1-{len(PROMPTS)} (default 4)")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens generated per prompt")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--workdir", default=None, help="keep shards and logs here")
    p.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-activations")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args, extra = parser.parse_known_args(argv)
    return args.func(args, extra)


if __name__ == "__main__":
    sys.exit(main())
