"""GPU check of the capture mechanism with torch alone (no vLLM on the GPU test machine).

What vLLM does on a GPU that the CPU build cannot show: the fused add+RMSNorm kernel works IN
PLACE (it overwrites both `hidden_states` and `residual` in the next layer), and the model is
compiled and replayed as CUDA graphs, where Python does not run. This script builds a toy
decoder with exactly that structure, an in-place fused add+RMSNorm custom op, and the capture
op's own body (vllm_activations/residual_copy.py, registered with torch.library because vLLM's
helper is unavailable here), compiles it with CUDA graphs (mode="reduce-overhead"), replays it
at several batch sizes, and compares the buffer with an eager, out-of-place reference.
It also shows why the copy must happen right after each layer: keeping references to the
layer outputs and reading them after the forward gives wrong values. The row bookkeeping op
(`record_rows`: each row's position and KV slot, from a persistent slot-mapping buffer that
is updated between replays, as vLLM's runners do) must hold the current step's values after a
replay. Last, the connector's device-to-host path: a bounded gather into device staging and
a pinned, non-blocking copy, right after a CUDA-graph replay wrote the buffer (no
synchronisation in between, as in the connector's `wait_for_save`), checked against the
eager reference across several staging chunks; then timed against a pageable `.cpu()` of the
same rows on the Qwen3-32B row shape.

    python bench/gpu_op_check.py        # prints PASS/FAIL per check, exit 1 on any FAIL

It needs an NVIDIA GPU and a CUDA build of torch; without one it says so and exits 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script
import time  # noqa: E402

from vllm_activations.residual_copy import (  # noqa: E402
    copy_residuals,
    copy_residuals_fake,
    record_rows,
)

LIB = "vllm_activations_check"


@torch.library.custom_op(f"{LIB}::fused_add_rms_norm", mutates_args=["x", "residual"])
def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> None:
    """In place, like vLLM's GPU kernel: residual += x; x = rmsnorm(residual) * weight."""
    residual.add_(x)
    var = residual.float().pow(2).mean(-1, keepdim=True)
    x.copy_((residual.float() * torch.rsqrt(var + 1e-6)).to(x.dtype) * weight)


capture_residuals = torch.library.custom_op(
    f"{LIB}::capture_residuals", copy_residuals, mutates_args=["buffer"]
)


@fused_add_rms_norm.register_fake
def _(x, residual, weight):
    return None


capture_residuals.register_fake(copy_residuals_fake)


@torch.library.custom_op(f"{LIB}::record_rows", mutates_args=["row_positions", "row_slots"])
def record_rows_op(
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    row_positions: torch.Tensor,
    row_slots: torch.Tensor,
) -> None:
    record_rows(positions, slot_mapping, row_positions, row_slots)


@record_rows_op.register_fake
def _(positions, slot_mapping, row_positions, row_slots):
    return None


class Layer(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.attn = torch.nn.Linear(hidden, hidden, bias=False)
        self.mlp = torch.nn.Linear(hidden, hidden, bias=False)
        self.w1 = torch.nn.Parameter(torch.rand(hidden) + 0.5)
        self.w2 = torch.nn.Parameter(torch.rand(hidden) + 0.5)

    def forward(self, h, residual, inplace: bool):
        # vLLM layer: input norm fused with the previous residual add, attention, post-attention
        # norm fused with the residual add, MLP; returns (mlp_out, post-attention residual).
        if residual is None:
            residual = h.clone()
            h = _rms(h) * self.w1
        elif inplace:
            fused_add_rms_norm(h, residual, self.w1)
        else:
            residual = residual + h
            h = _rms(residual) * self.w1
        a = torch.tanh(self.attn(h))
        if inplace:
            fused_add_rms_norm(a, residual, self.w2)
            h = a
        else:
            residual = residual + a
            h = _rms(residual) * self.w2
        return torch.nn.functional.silu(self.mlp(h)), residual


def _rms(x):
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(var + 1e-6)).to(x.dtype)


class Model(torch.nn.Module):
    def __init__(self, layers: int, hidden: int, rows: int, capture: bool) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(Layer(hidden) for _ in range(layers))
        self.register_buffer("buffer", torch.zeros(rows, 2 * layers, hidden), persistent=False)
        self.register_buffer("row_positions", torch.full((rows,), -1), persistent=False)
        self.register_buffer("row_slots", torch.full((rows,), -1), persistent=False)
        # The runner's persistent slot mapping: refreshed in place before every replay.
        self.register_buffer("slot_mapping", torch.full((rows,), -1), persistent=False)
        self.capture = capture
        self.kept: list = []

    def forward(self, x, positions=None, inplace: bool = True):
        if self.capture and positions is not None:
            n = x.shape[0]
            record_rows_op(positions, self.slot_mapping[:n], self.row_positions, self.row_slots)
        h, residual = x, None
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, inplace)
            if self.capture:
                capture_residuals(h, residual, self.buffer, 2 * i)
            else:
                self.kept.append((h, residual))  # the wrong way: read after the forward
        return h + residual


def reference(model: Model, x: torch.Tensor) -> torch.Tensor:
    """Out-of-place eager forward: [T, 2L, H] post-attention / post-MLP residuals."""
    rows, h, residual = [], x, None
    with torch.no_grad():
        for layer in model.layers:
            h, residual = layer(h, residual, inplace=False)
            rows += [residual.clone(), (h + residual).clone()]
    return torch.stack(rows, 1)


def main() -> int:
    if not torch.cuda.is_available():
        print(
            f"FAIL: no CUDA device (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}): this check needs an NVIDIA GPU; nothing was run"
        )
        return 1
    torch.manual_seed(0)
    device = "cuda"
    layers, hidden, rows = 6, 256, 512
    model = Model(layers, hidden, rows, capture=True).to(device).eval()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    failures = 0
    with torch.no_grad():
        for step, n in enumerate((7, 64, 200, 64, 7, 512)):  # repeats replay recorded graphs
            x = torch.randn(n, hidden, device=device)
            positions = torch.arange(n, device=device) + 1000 * step
            model.buffer.zero_()
            for _ in range(3):
                slots = torch.randperm(4 * rows, device=device)[:n]
                model.slot_mapping[:n].copy_(slots)  # as the runner updates it between steps
                compiled(x.clone(), positions)
            torch.cuda.synchronize()
            got = model.buffer[:n].clone()
            want = reference(model, x)
            err = (got - want).abs().max().item() / want.abs().max().item()
            rows_ok = (
                torch.equal(model.row_positions[:n], positions)
                and torch.equal(model.row_slots[:n], slots)
                and bool((model.row_slots[n:] == -1).all())
            )
            ok = err < 1e-5 and rows_ok
            failures += not ok
            print(
                f"{'PASS' if ok else 'FAIL'}: compiled+CUDA graphs, in-place norm, {n:3d} "
                f"tokens: max rel diff {err:.2e}; row positions and slots of this replay "
                f"{'recorded' if rows_ok else 'WRONG'}"
            )
        wrong = Model(layers, hidden, rows, capture=False).to(device).eval()
        wrong.load_state_dict(model.state_dict())
        x = torch.randn(64, hidden, device=device)
        wrong(x.clone())
        late = torch.stack([t for h, r in wrong.kept for t in (r, h + r)], 1)
        err = (late - reference(model, x)).abs().max().item()
        print(
            f"{'PASS' if err > 1e-3 else 'FAIL'}: reading references after the forward is "
            f"wrong with the in-place norm (max abs diff {err:.2f}), as expected"
        )
        failures += err <= 1e-3
        failures += staged_after_replay(model, compiled, hidden, device)
    failures += staging_check(device)
    print("ALL PASS" if failures == 0 else f"{failures} FAILED")
    return 1 if failures else 0


def staged_after_replay(model: Model, compiled, hidden: int, device: str) -> int:
    """The connector's copy-out right after a CUDA-graph replay: the kept rows x columns
    gathered in small chunks into device staging, each copied to pinned host memory with
    `non_blocking=True` and one stream synchronisation (worker.py `_staged_rows`), with no
    synchronisation between the replay and the gather. Returns failures."""
    n, sites = 200, model.buffer.shape[1]  # a size the loop above recorded a graph for
    x = torch.randn(n, hidden, device=device)
    model.slot_mapping[:n].copy_(torch.arange(n, device=device))
    compiled(x.clone(), torch.arange(n, device=device))  # no synchronize: stream order only
    rows = torch.randperm(n, device=device)[: n // 2].sort().values
    columns = torch.arange(1, sites, 2, device=device)  # post_mlp sites only, a column subset
    chunk = 37  # rows per staging chunk: several chunks, the last one partial
    width = len(columns)
    staging = torch.empty(chunk * width, hidden, device=device)
    host = torch.empty(chunk * width, hidden, pin_memory=True)
    flat = model.buffer.view(-1, hidden)
    got = []
    for start in range(0, len(rows), chunk):
        index = rows[start : start + chunk]
        k = len(index)
        flat_index = (index[:, None] * sites + columns[None, :]).view(-1)
        torch.index_select(flat, 0, flat_index, out=staging[: k * width])
        host[: k * width].copy_(staging[: k * width], non_blocking=True)
        torch.cuda.current_stream().synchronize()
        got.append(host[: k * width].view(k, width, hidden).clone())
    want = reference(model, x)[rows][:, columns].cpu()
    err = (torch.cat(got) - want).abs().max().item() / want.abs().max().item()
    ok = err < 1e-5
    print(
        f"{'PASS' if ok else 'FAIL'}: pinned non-blocking staging copy right after a CUDA-graph "
        f"replay ({len(rows)} rows x {width} columns in {chunk}-row chunks): max rel diff "
        f"{err:.2e}"
    )
    return 0 if ok else 1


def staging_check(device: str, rows: int = 2048, sites: int = 128, hidden: int = 5120) -> int:
    """The connector's device-to-host path on the Qwen3-32B row shape (64 layers x 2 sites x
    5120, bf16): chunks of <= 256 MiB gathered into device staging, then one pinned,
    non-blocking copy each, against a pageable `.cpu()` of the same rows. Returns failures."""
    buffer = torch.randn(rows, sites, hidden, device=device).to(torch.bfloat16)
    chunk = max(1, (256 * 2**20) // (sites * hidden * 2))
    staging = torch.empty((chunk, sites, hidden), dtype=buffer.dtype, device=device)
    host = torch.empty((chunk, sites, hidden), dtype=buffer.dtype, pin_memory=True)
    index = torch.randperm(rows, device=device)[: rows // 2]
    checked = []

    def pinned(check: bool = False) -> None:
        for start in range(0, len(index), chunk):
            part = index[start : start + chunk]
            torch.index_select(buffer, 0, part, out=staging[: len(part)])
            host[: len(part)].copy_(staging[: len(part)], non_blocking=True)
            torch.cuda.current_stream().synchronize()
            if check:
                checked.append(torch.equal(host[: len(part)], buffer[part].cpu()))

    def pageable() -> None:
        for start in range(0, len(index), chunk):
            buffer.index_select(0, index[start : start + chunk]).cpu()

    pinned(check=True)
    ok = bool(checked) and all(checked)
    nbytes = len(index) * sites * hidden * 2
    timings = {}
    for name, fn in (("pinned", pinned), ("pageable", pageable)):
        fn()  # warm-up
        runs = []
        for _ in range(5):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            runs.append(time.perf_counter() - start)
        timings[name] = sorted(runs)
    best = {k: nbytes / v[0] / 1e9 for k, v in timings.items()}
    spread = {k: (v[-1] - v[0]) / v[0] for k, v in timings.items()}
    print(
        f"{'PASS' if ok else 'FAIL'}: pinned staging copy of {nbytes / 2**30:.2f} GiB in "
        f"{chunk}-row chunks equals the rows; {best['pinned']:.1f} GB/s vs pageable "
        f"{best['pageable']:.1f} GB/s ({best['pinned'] / best['pageable']:.2f}x, best of 5; "
        f"spread {spread['pinned']:.0%} / {spread['pageable']:.0%})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
