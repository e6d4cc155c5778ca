"""`vllm-activations selftest`: the acceptance run for a new machine. It captures on this
machine and checks the invariants a CPU test run cannot see (CUDA graphs, in-place fused
kernels, Model Runner V2, async scheduling, batching), printing a PASS/FAIL table and writing
a JSON report.

It starts its own servers, one after the other: per configuration the default compiled /
CUDA-graph mode, and for the default configuration also `--enforce-eager`. Configurations: the
launcher's default (V1 runner, synchronous scheduling); on a GPU also Model Runner V2 + async
scheduling (vLLM's GPU defaults, opt-in in `serve`), and TP=2 when two GPUs are present.
Checks per configuration:

1. engine: the runner, CUDA-graph mode and scheduling that actually ran (recorded in the shard).
2. batch == solo: rows of requests run concurrently equal rows of the same requests run alone
   (no row is attributed to the wrong request or position).
3. position modes: `prompt`, `generated`, `last`, `every:3` keep exactly their positions, with
   the rows an `all` capture of the same request has.
4. stop token: a request that stops on a token (decided in the engine core, like EOS, so async
   scheduling has forwarded one more token) with `last` + channel statistics: the last row and
   statistics over exactly P+G-1 tokens (equal to a teacher-forced run of those tokens).
5. shared prefix: two concurrent captures sharing a 64-token prefix (`all` and `generated`,
   the second reading the prefix cache) equal solo runs.
6. full step: a prompt of max_num_batched_tokens tokens in one forward (no out-of-memory).
7. layer chaining: each captured residual is the one the next block added to. The blocks are
   linear in what the channel statistics record, so over a request's tokens
       sum_t (post_attention[l] - post_mlp[l-1]) == W_o[l] @ sum_t o_proj_input[l]
       sum_t (post_mlp[l] - post_attention[l])   == W_down[l] @ sum_t down_proj_input[l]
   with post_mlp[-1] the token embeddings. The weights come from the checkpoint itself
   (block-scaled FP8 is dequantized), not from vLLM, so a residual that is stale, taken from
   another row, or not the one layer l+1 consumed fails it.
8. compiled == eager (default configuration), including a 600-token prompt: CUDA graphs and
   Inductor fusions replay the capture op, so a copy recorded at the wrong point of a graph
   (e.g. after the next layer's in-place add+RMSNorm overwrote its input) shows up here; and
   each opt-in configuration's shards equal the default's.
9. summary == its rows: concurrent `summary: true` captures (`all`, `every:3` on the 600-token
   prompt, `generated`) that keep their float32 rows: the sums accumulated on the device
   (after each forward, on the rows the connector gives each request) equal the analyzer's on
   the same rows, every population, within 1e-4 (`actclient crosscheck`,
   client/actclient/analysis/crosscheck.py).
10. stop string: a request the front end ends on a stop string (and aborts in the engine)
   still gets its shard, with rows equal to a full capture's and a summary equal to its rows.

After the checks, on each configuration's compiled server, the capture overhead on this
machine is measured (not checked): batches of `--overhead-requests` concurrent tour prompts x
`--overhead-tokens` tokens through the sidecar's /v1/completions, without capture and with
last-token, quarter-of-the-layers, all-layers and summary-only capture (each waited for until
its shard is durable), in rounds rotated like bench/bench_capture.py's; the table gives each
variant's median ratio to the same round's no-capture batch and its range.

Greedy generations may diverge between modes in low precision; shards are compared only on the
positions whose input tokens agree. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from vllm_activations.contract.shard import Shard, ShardReader, read_shard
from vllm_activations.contract.spec import CaptureSpec
from vllm_activations.openai_capture import capture_params, completion_body, wait_for_shard
from vllm_activations.process import ServerProcess

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


def _capture(
    server: ServerProcess,
    prompt: str | list[int],
    max_tokens: int,
    dtype: str,
    spec: CaptureSpec | None = None,
    **sampling,
) -> Path:
    return _complete(server, prompt, max_tokens, dtype, spec, **sampling)[1]


def _complete(
    server: ServerProcess,
    prompt: str | list[int],
    max_tokens: int,
    dtype: str,
    spec: CaptureSpec | None = None,
    **sampling,
) -> tuple[dict, Path]:
    """The completion (through the sidecar's /v1) and the path of its shard."""
    body = completion_body(
        model="model",
        prompt=prompt,
        spec=spec or CaptureSpec(dtype=dtype, channel_stats=True),
        max_tokens=max_tokens,
        temperature=0.0,
        **{"ignore_eos": True, **sampling},
    )
    answer = _post_completion(server, body)
    return answer, _shard_of(server, answer)


def _post_completion(server: ServerProcess, body: dict) -> dict:
    """POST a completion body to the sidecar's /v1/completions; its JSON answer."""
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=900)
    if r.status_code != 200:
        raise RuntimeError(f"capture failed: HTTP {r.status_code} {r.text[:500]}")
    return r.json()


def _shard_of(server: ServerProcess, answer: dict) -> Path:
    """The shard a capture completion names, once it is complete."""
    return wait_for_shard(capture_params(answer), timeout=600, shard_dir=server.shard_dir)


def capture_prompts(
    server: ServerProcess, prompts: list, max_tokens: int, dtype: str, *, together: bool
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


# ------------------------------------------------------------------ checks on a running server


@dataclass
class Session:
    """One running server and what the checks need to know about it."""

    label: str
    server: ServerProcess
    dtype: str
    tolerance: tuple
    max_tokens: int
    step_tokens: int
    max_model_len: int
    expect: dict


def _rows_at(shard: Shard, positions: list[int]) -> dict[str, np.ndarray]:
    index = np.searchsorted(shard.positions, positions)
    if not np.array_equal(shard.positions[index], positions):
        raise ValueError(f"{shard.path.name} lacks some of positions {positions[:4]}...")
    return {site: x[:, index] for site, x in shard.layer_outputs.items()}


def _cosines(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> np.ndarray:
    out = []
    for site in a:
        x, y = a[site], b[site]
        den = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
        out.append(np.where(den > 0, (x * y).sum(-1) / np.maximum(den, 1e-30), 1.0).ravel())
    return np.concatenate(out)


def _rows_agree(a: Shard, b: Shard, positions: list[int], tolerance: tuple) -> tuple[bool, float]:
    cos = _cosines(_rows_at(a, positions), _rows_at(b, positions))
    worst = float(cos.min()) if len(cos) else 1.0
    return worst >= tolerance[1], worst


def check_engine(s: Session) -> CheckResult:
    """Which runner, CUDA-graph mode and scheduling actually ran (the shard records it)."""
    with ShardReader(_capture(s.server, "Hello", 2, s.dtype)) as reader:
        engine = dict(reader.attrs.get("engine") or {})
    detail = (
        f"model runner {engine.get('model_runner')}, cudagraph_mode "
        f"{engine.get('cudagraph_mode')}, async scheduling {engine.get('async_scheduling')}, "
        f"{engine.get('max_num_batched_tokens')} tokens/step, "
        f"TP {engine.get('tensor_parallel_size')}"
    )
    wrong = [
        f"{k} is {engine.get(k)!r}, asked {v!r}" for k, v in s.expect.items() if engine.get(k) != v
    ]
    return CheckResult("engine", not wrong, detail + ("; " + "; ".join(wrong) if wrong else ""))


def check_position_modes(s: Session, prompt: str) -> CheckResult:
    """Every position mode keeps exactly its positions, with the rows an `all` capture has."""
    full = read_shard(_capture(s.server, prompt, s.max_tokens, s.dtype))
    problems, worst = [], 1.0
    for mode in ("prompt", "generated", "last", "every:3"):
        spec = CaptureSpec(positions=mode, dtype=s.dtype)
        shard = read_shard(_capture(s.server, prompt, s.max_tokens, s.dtype, spec=spec))
        want = spec.expected_positions(len(shard.input_tokens), len(shard.output_tokens))
        if shard.positions.tolist() != want:
            problems.append(f"{mode}: positions {shard.positions.tolist()[:6]} != {want[:6]}")
            continue
        same = _common_positions(full, shard)
        kept = [p for p in want if p < same]
        ok, cos = _rows_agree(shard, full, kept, s.tolerance)
        worst = min(worst, cos)
        if not ok:
            problems.append(f"{mode}: worst cosine {cos:.6f} against the `all` capture")
    detail = "; ".join(problems) or f"prompt, generated, last, every:3; worst cosine {worst:.6f}"
    return CheckResult("position modes", not problems, detail)


def check_stop(s: Session, prompt: str) -> CheckResult:
    """A request that stops on a token (like EOS, decided in the engine core, so async
    scheduling has already forwarded one token more) with `last` + channel statistics."""
    probe = read_shard(_capture(s.server, prompt, s.max_tokens, s.dtype))
    out = probe.output_tokens.tolist()
    k = next((i for i in range(2, len(out)) if out[i] not in out[:i]), None)
    if k is None:
        return CheckResult("stop token, last + channel_stats", False, "no usable stop token")
    spec = CaptureSpec(positions="last", dtype=s.dtype, channel_stats=True)
    shard_path = _capture(
        s.server, prompt, s.max_tokens, s.dtype, spec=spec, ignore_eos=False,
        stop_token_ids=[out[k]],
    )  # fmt: skip
    shard = read_shard(shard_path)
    p, g = len(shard.input_tokens), len(shard.output_tokens)
    problems = []
    if g != k + 1:
        problems.append(f"generated {g} tokens, expected to stop after {k + 1}")
    if shard.positions.tolist() != [p + g - 2]:
        problems.append(f"positions {shard.positions.tolist()} != [{p + g - 2}]")
    else:
        ok, cos = _rows_agree(shard, probe, [p + g - 2], s.tolerance)
        if not ok:
            problems.append(f"last row cosine {cos:.6f} against the full capture")
    # The statistics must cover exactly the forwarded tokens: a teacher-forced capture of the
    # same P+G-1 tokens records the same sums.
    forced_ids = probe.input_tokens.tolist() + out[: g - 1]
    forced = _capture(s.server, forced_ids, 1, s.dtype, spec=spec)
    with ShardReader(shard_path) as a, ShardReader(forced) as b:
        for kind in ("mlp_intermediate", "attn_heads"):
            count = a.dataset(f"channel_stats/{kind}/count")
            if count.tolist() != [p + g - 1] * len(count):
                problems.append(f"{kind}: {count[0]} tokens counted, forwarded {p + g - 1}")
            x, y = a.dataset(f"channel_stats/{kind}/sum"), b.dataset(f"channel_stats/{kind}/sum")
            rel = float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30))
            if rel > s.tolerance[2]:
                problems.append(f"{kind}: sums differ from a forced run by {rel:.2e}")
    return CheckResult(
        "stop token, last + channel_stats",
        not problems,
        "; ".join(problems)
        or f"stopped after {g} tokens; row and statistics of P+G-1 = "
        f"{p + g - 1} tokens, none past the stop",
    )


def check_shared_prefix(s: Session, ids: list[int]) -> CheckResult:
    """Two concurrent captures sharing a 64-token prefix (`all` and `generated`), against
    the same requests run alone."""
    prefix = (ids * (64 // max(len(ids), 1) + 2))[:64]
    prompts = [prefix + ids[:8], prefix + ids[-8:][::-1]]
    specs = [CaptureSpec(dtype=s.dtype), CaptureSpec(positions="generated", dtype=s.dtype)]
    with cf.ThreadPoolExecutor(2) as pool:
        together = list(
            pool.map(
                lambda j: _capture(s.server, j[0], s.max_tokens, s.dtype, spec=j[1]),
                zip(prompts, specs, strict=True),
            )
        )
    problems, worst = [], 1.0
    for prompt, path in zip(prompts, together, strict=True):
        shard, solo = (
            read_shard(path),
            read_shard(_capture(s.server, prompt, s.max_tokens, s.dtype)),
        )
        same = _common_positions(shard, solo)
        ok, cos = _rows_agree(
            shard, solo, [p for p in shard.positions.tolist() if p < same], s.tolerance
        )
        worst = min(worst, cos)
        if not ok:
            problems.append(f"{shard.path.name}: worst cosine {cos:.6f} against a solo run")
    return CheckResult(
        "shared 64-token prefix (all + generated)",
        not problems,
        "; ".join(problems) or f"worst cosine {worst:.6f} against solo runs",
    )


def check_full_step(s: Session, ids: list[int]) -> CheckResult:
    """A prompt that fills one engine step (the capture buffer's every row) in one forward."""
    n = min(s.step_tokens, s.max_model_len - 4)
    prompt = (ids * (n // max(len(ids), 1) + 1))[:n]
    spec = CaptureSpec(positions="last", dtype=s.dtype, channel_stats=True)
    start = time.perf_counter()
    shard = read_shard(_capture(s.server, prompt, 2, s.dtype, spec=spec))
    seconds = time.perf_counter() - start
    ok = shard.positions.tolist() == [n] and len(shard.input_tokens) == n
    return CheckResult(
        f"full {n}-token step",
        ok,
        f"{n}-token prompt + 2 tokens with statistics in {seconds:.2f} s (no out-of-memory)"
        if ok
        else f"positions {shard.positions.tolist()}",
    )


def _summary_faults(paths: list[Path]) -> list[str]:
    """The summary cross-check of each shard (`actclient crosscheck`, the analyzer's: the
    server never imports the client): the device's sums against the analysis of the same
    shard's own rows. One line per quantity over its tolerance."""
    cmd = [sys.executable, "-m", "actclient", "crosscheck", "--json", *map(str, paths)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode not in (0, 1) or not done.stdout.strip():
        raise RuntimeError(
            f"`actclient crosscheck` failed ({done.returncode}): "
            f"{(done.stderr.strip() or done.stdout.strip())[-400:]}"
        )
    faults = json.loads(done.stdout)
    return [f"{Path(path).name}: {fault}" for path, found in faults.items() for fault in found]


def check_summary(s: Session, prompts: list) -> CheckResult:
    """Summary capture on the device (CUDA graphs, batching, chunked prefill): concurrent
    `summary: true` captures that keep their rows, each with another positions rule; each
    shard's device sums must equal the analysis of its own rows (within 1e-4; float32 rows,
    so both see the same values)."""
    modes = ("all", "every:3", "generated", "all")
    jobs = [
        (prompt, CaptureSpec(positions=mode, dtype="float32", summary=True))
        for prompt, mode in zip(prompts[:3], modes, strict=False)
    ]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        paths = list(
            pool.map(lambda j: _capture(s.server, j[0], s.max_tokens, s.dtype, spec=j[1]), jobs)
        )
    problems = _summary_faults(paths)
    tokens = 0
    for path in paths:
        with ShardReader(path) as reader:
            tokens += len(reader.positions)
    names = ", ".join(spec.positions for _, spec in jobs)
    return CheckResult(
        "summary == its rows",
        not problems,
        "; ".join(problems[:4])
        or f"{len(paths)} concurrent requests ({names}), {tokens} tokens: every population's "
        "similarity, angles, norms, moments and massive counts within 1e-4",
    )


def check_stop_string(s: Session, prompt: str) -> CheckResult:
    """A request that ends on a stop string: vLLM's front end finds it after detokenising and
    aborts the request in the engine (which, with async scheduling, may have run further).
    The shard must still arrive, hold the rows of what the engine computed (equal to a full
    capture's), and its summary must equal those rows' analysis."""
    spec = CaptureSpec(dtype="float32", summary=True)
    full_answer, full_path = _complete(s.server, prompt, s.max_tokens, s.dtype, spec=spec)
    text = full_answer["choices"][0]["text"]
    middle = len(text) // 2
    stop = text[middle : middle + 2]
    if len(stop.strip()) < 1:
        return CheckResult("stop string", False, f"no usable stop string in {text!r}")
    answer, path = _complete(s.server, prompt, s.max_tokens, s.dtype, spec=spec, stop=[stop])
    choice = answer["choices"][0]
    full, shard = read_shard(full_path), read_shard(path)
    problems = []
    if choice.get("finish_reason") != "stop" or len(choice["text"]) >= len(text):
        problems.append(f"finish {choice.get('finish_reason')!r}, text {choice['text']!r}")
    same = _common_positions(full, shard)
    kept = [p for p in shard.positions.tolist() if p < same]
    if len(kept) < len(shard.input_tokens):
        problems.append(f"only {len(kept)} rows comparable with the full capture")
    ok, cos = _rows_agree(shard, full, kept, s.tolerance)
    if not ok:
        problems.append(f"worst cosine {cos:.6f} against the full capture")
    problems += _summary_faults([path])
    return CheckResult(
        "stop string (summary + rows)",
        not problems,
        "; ".join(problems[:4])
        or f"stopped on {stop!r} after {len(shard.output_tokens)} of {s.max_tokens} tokens; "
        f"rows agree with the full capture (worst cosine {cos:.6f}), summary == its rows",
    )


def long_prompt(ids: list[int], n: int = 600) -> list[int]:
    """A prompt above 512 tokens (compiled graphs and kernels switch paths past 512)."""
    return (ids * (n // max(len(ids), 1) + 1))[:n]


# ------------------------------------------------------------------ capture overhead


def overhead_variants(num_layers: int) -> list[tuple[str, CaptureSpec | None]]:
    """What `measure_overhead` times: no capture (the baseline), then the capture variants of
    bench/bench_capture.py."""
    return [
        ("no capture", None),
        ("last token only", CaptureSpec(positions="last")),
        ("a quarter of the layers", CaptureSpec(layers=tuple(range(0, num_layers, 4)))),
        ("all layers x both sites", CaptureSpec()),
        ("summary only, all layers", CaptureSpec(summary=True, tensors=False)),
    ]


def _timed_batch(server: ServerProcess, prompts: list, max_tokens: int, spec) -> float:
    """Wall seconds of `prompts` sent at once through the sidecar's /v1/completions, each
    capture waited for until its shard is durable (as a recording client does); the shards
    are deleted afterwards, untimed."""

    def one(prompt) -> Path | None:  # noqa: ANN001 - text or token ids
        body = {
            "model": "model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True,
        }  # fmt: skip
        if spec is None:
            _post_completion(server, body)
            return None
        return _shard_of(server, _post_completion(server, completion_body(spec=spec, **body)))

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        paths = list(pool.map(one, prompts))
    seconds = time.perf_counter() - start
    for path in paths:
        if path is not None:
            path.unlink(missing_ok=True)
    return seconds


def measure_overhead(
    server: ServerProcess, model_dir: Path, requests: int, max_tokens: int, rounds: int
) -> dict:
    """Capture overhead on this machine, on the running server: `requests` concurrent tour
    prompts x `max_tokens` tokens (EOS ignored, so every variant computes the same tokens)
    per batch, every variant once per round in an order rotated each round, after one
    warm-up batch each. Per variant: the median and range of the wall times and of the
    ratio to the same round's no-capture batch."""
    from vllm_activations.cli import model_dimensions  # the launcher's reading of config.json

    variants = overhead_variants(model_dimensions(str(model_dir))[0])
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    for _, spec in variants:  # warm-up: new shapes compile, buffers are allocated
        _timed_batch(server, prompts, max_tokens, spec)
    walls: dict[str, list[float]] = {name: [] for name, _ in variants}
    for r in range(rounds):
        for name, spec in variants[r % len(variants) :] + variants[: r % len(variants)]:
            walls[name].append(_timed_batch(server, prompts, max_tokens, spec))
    base = walls["no capture"]
    result = {}
    for name, w in walls.items():
        ratios = [x / b for x, b in zip(w, base, strict=True)]
        result[name] = {
            "wall_s": [round(x, 3) for x in w],
            "ratio_median": round(float(np.median(ratios)), 4),
            "ratio_range": [round(min(ratios), 4), round(max(ratios), 4)],
        }
    return {"requests": requests, "max_tokens": max_tokens, "rounds": rounds, "variants": result}


def print_overhead(overhead: dict[str, dict]) -> None:
    for label, m in overhead.items():
        print(
            f"\ncapture overhead [{label}]: {m['requests']} concurrent requests x "
            f"{m['max_tokens']} tokens, {m['rounds']} rounds, ratio to the same round's "
            "no-capture batch (a measurement, not a check)"
        )
        for name, v in m["variants"].items():
            lo, hi = v["ratio_range"]
            print(
                f"  {name:26s} {float(np.median(v['wall_s'])):8.2f} s   "
                f"{v['ratio_median']:.3f}x ({lo:.3f}-{hi:.3f})"
            )


# ------------------------------------------------------------------ driver


def local_model_dir(model: str) -> Path:
    """A local directory for `model` (a path, or a Hugging Face id already in the cache)."""
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors"]))


def _gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def configurations(args: argparse.Namespace) -> list[tuple[str, list[str], dict]]:
    """(label, extra serve flags, engine facts the shard must show) per pass."""
    tp = args.tensor_parallel_size
    configs = [("default", [], {"model_runner": "v1", "async_scheduling": False})]
    gpus = _gpu_count()
    if gpus and not args.no_opt_in:
        configs.append(
            (
                "V2 + async",
                ["--model-runner-v2", "--async-scheduling"],
                {"model_runner": "v2", "async_scheduling": True},
            )
        )
    if gpus >= 2 and tp == 1:
        configs.append(("TP=2", ["--tensor-parallel-size", "2"], {"tensor_parallel_size": 2}))
    return configs


def _step_tokens(extra: list[str]) -> int:
    from vllm_activations.cli import DEFAULT_MAX_NUM_BATCHED_TOKENS, _flag_value

    return int(_flag_value(extra, "--max-num-batched-tokens") or DEFAULT_MAX_NUM_BATCHED_TOKENS)


def _tokenize(server: ServerProcess, text: str) -> list[int]:
    r = httpx.post(
        f"{server.url}/tokenize", json={"model": "model", "prompt": text},
        headers=server.headers, timeout=60,
    )  # fmt: skip
    if r.status_code != 200:  # the sidecar has no /tokenize: ask a capture's shard instead
        with ShardReader(_capture(server, text, 1, "float32")) as reader:
            return reader.dataset("input_tokens").tolist()
    return r.json()["tokens"]


def run_configuration(
    label: str,
    flags: list[str],
    expect: dict,
    args: argparse.Namespace,
    model_dir: Path,
    serve_args: list[str],
    workdir: Path,
    results: list[tuple[str, CheckResult]],
    overhead: dict[str, dict],
) -> dict[str, list[Path]]:
    """Start the configuration's server(s), run every check (and, on the compiled server,
    the overhead measurement into `overhead`), return the solo shards."""
    prompts: list = list(PROMPTS[: args.prompts])
    shards: dict[str, list[Path]] = {}
    modes = [("compiled", [])] + ([("eager", ["--enforce-eager"])] if label == "default" else [])
    tolerance = TOLERANCES["bfloat16"]
    for mode, mode_args in modes:
        print(f"selftest [{label}]: starting the {mode} server on {model_dir} ...", flush=True)
        server = ServerProcess(
            model_dir, workdir / label.replace(" ", "") / mode, [*serve_args, *flags, *mode_args]
        )
        try:
            server.wait_ready()
            dtype = _served_dtype(server)
            tolerance = TOLERANCES.get(dtype, TOLERANCES["bfloat16"])
            if CheckpointWeights(model_dir).quantization:
                tolerance = QUANTIZED_TOLERANCE
            ids = _tokenize(server, PROMPTS[0])
            prompts = list(PROMPTS[: args.prompts])  # the same list for every mode
            if args.max_model_len > 600 + args.max_tokens:
                prompts = [*prompts[:1], long_prompt(ids), *prompts[1:]]
            shards[mode] = capture_prompts(server, prompts, args.max_tokens, dtype, together=False)
            if mode != "compiled":
                continue
            session = Session(
                label, server, dtype, tolerance, args.max_tokens, _step_tokens(serve_args),
                args.max_model_len, expect,
            )  # fmt: skip
            for result in compiled_checks(session, prompts, shards["compiled"], ids, model_dir):
                results.append((label, result))
            if args.overhead_rounds > 0:
                print(f"selftest [{label}]: measuring the capture overhead ...", flush=True)
                try:
                    overhead[label] = measure_overhead(
                        server, model_dir, args.overhead_requests, args.overhead_tokens,
                        args.overhead_rounds,
                    )  # fmt: skip
                except Exception as exc:  # noqa: BLE001 - a measurement, not a check
                    print(f"selftest [{label}]: overhead not measured: {exc}", flush=True)
        finally:
            server.stop()
    if "eager" in shards:
        results.append(
            (
                label,
                compare(
                    "compiled == eager (incl. a 600-token prompt)",
                    list(zip(shards["compiled"], shards["eager"], strict=True)),
                    tolerance,
                ),
            )
        )
    return shards


def compiled_checks(
    s: Session, prompts: list, solo: list[Path], ids: list[int], model_dir: Path
) -> list[CheckResult]:
    """Every check on the compiled (CUDA-graph) server; one failing does not stop the rest."""

    def batch_equals_solo() -> CheckResult:
        together = capture_prompts(s.server, prompts, s.max_tokens, s.dtype, together=True)
        return compare("batch == solo", list(zip(together, solo, strict=True)), s.tolerance)

    checks = [
        ("engine", lambda: check_engine(s)),
        ("batch == solo", batch_equals_solo),
        ("position modes", lambda: check_position_modes(s, PROMPTS[1])),
        ("stop token, last + channel_stats", lambda: check_stop(s, PROMPTS[0])),
        ("shared 64-token prefix (all + generated)", lambda: check_shared_prefix(s, ids)),
        ("full step", lambda: check_full_step(s, ids)),
        ("summary == its rows", lambda: check_summary(s, prompts)),
        ("stop string (summary + rows)", lambda: check_stop_string(s, PROMPTS[2])),
        ("layer chaining", lambda: chain_check(solo, model_dir, s.tolerance)),
    ]
    results = []
    for name, check in checks:
        try:
            results.append(check())
        except Exception as exc:  # noqa: BLE001 - a selftest reports, it does not crash
            results.append(CheckResult(name, False, f"error: {exc}"))
    return results


def print_table(results: list[tuple[str, CheckResult]]) -> None:
    width = max((len(c) for c, _ in results), default=7)
    names = max((len(r.name) for _, r in results), default=5)
    print(f"\n{'config':<{width}}  {'check':<{names}}  result  detail")
    for config, r in results:
        print(
            f"{config:<{width}}  {r.name:<{names}}  {'PASS' if r.passed else 'FAIL':<6}  {r.detail}"
        )


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.quick:
        args.prompts, args.max_tokens = min(args.prompts, 2), min(args.max_tokens, 12)
        args.overhead_requests = min(args.overhead_requests, 4)
        args.overhead_tokens = min(args.overhead_tokens, 12)
        args.overhead_rounds = min(args.overhead_rounds, 2)
    if args.model is None:
        from vllm_activations import embedded

        model_dir = embedded.smollm2()
    else:
        model_dir = local_model_dir(args.model)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="selftest-"))
    serve_args = [
        "--served-model-name", "model",
        "--tensor-parallel-size", str(args.tensor_parallel_size),
        "--max-model-len", str(args.max_model_len),
        *extra,
    ]  # fmt: skip
    if args.dtype:
        serve_args += ["--dtype", args.dtype]
    results: list[tuple[str, CheckResult]] = []
    started = time.perf_counter()
    solo: dict[str, list[Path]] = {}
    overhead: dict[str, dict] = {}
    for label, flags, expect in configurations(args):
        try:
            solo[label] = run_configuration(
                label, flags, expect, args, model_dir, serve_args, workdir, results, overhead
            ).get("compiled", [])
        except Exception as exc:  # noqa: BLE001 - a selftest reports, it does not crash
            results.append((label, CheckResult("server and captures", False, str(exc))))
    for label, paths in solo.items():
        if label != "default" and paths and solo.get("default"):
            results.append(
                (
                    label,
                    compare(
                        f"{label} == default",
                        list(zip(paths, solo["default"], strict=True)),
                        TOLERANCES["bfloat16"],
                    ),
                )
            )
    print_table(results)
    print_overhead(overhead)
    failed = [r for _, r in results if not r.passed]
    verdict = "FAIL" if failed else "PASS"
    report = Path(args.report) if args.report else workdir / "selftest-report.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(
        json.dumps(
            {
                "verdict": verdict,
                "model": str(args.model or model_dir),
                "seconds": round(time.perf_counter() - started, 1),
                "gpus": _gpu_count(),
                "checks": [
                    {"config": c, "check": r.name, "passed": r.passed, "detail": r.detail}
                    for c, r in results
                ],
                "overhead": overhead,
            },
            indent=2,
        )
    )
    print(f"\nselftest: {verdict} ({len(results) - len(failed)}/{len(results)} checks)")
    print(f"selftest: report written to {report}")
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
        help="the acceptance run for a new machine: capture and check compiled == eager, "
        "layer chaining, batch == solo, every position mode, a stop token, a stop string, a "
        "shared prefix, a full step and summary capture, in the tested configuration and (on "
        "GPUs) with Model Runner V2 + async scheduling, then measure the capture overhead; "
        "unknown arguments go to the servers",
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
    p.add_argument(
        "--quick",
        action="store_true",
        help="2 prompts, 12 tokens, overhead batches of 4 requests x 12 tokens in 2 rounds "
        "(CPU test mode)",
    )
    p.add_argument(
        "--no-opt-in",
        action="store_true",
        help="skip the pass with Model Runner V2 + async scheduling (run on GPUs only)",
    )
    p.add_argument(
        "--overhead-requests",
        type=int,
        default=16,
        help="concurrent requests per batch of the overhead measurement (default 16)",
    )
    p.add_argument(
        "--overhead-tokens",
        type=int,
        default=64,
        help="tokens generated per request of the overhead measurement (default 64)",
    )
    p.add_argument(
        "--overhead-rounds",
        type=int,
        default=3,
        help="rounds of the overhead measurement, each variant once per round (0: skip it)",
    )
    p.add_argument("--report", default=None, help="JSON report path (default: in the workdir)")
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
