"""What one capture request is: the capture spec from the command-line flags, and the
/generate_with_activations body for one Phase 1 record."""

from __future__ import annotations

from typing import Any

from actclient.phase1.dataset import Phase1Record
from actclient.record.errors import RecordError
from vllm_activations.contract.spec import CaptureSpec, CaptureSpecError

MODES = ("generate", "teacher-forced")


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def capture_spec_from_flags(
    layers: str | None = None,
    sites: str | None = None,
    positions: str | None = None,
    dtype: str | None = None,
    channel_stats: bool | None = None,
    teacher_logprobs: int | None = None,
    summary_only: bool = False,
) -> CaptureSpec:
    """A validated CaptureSpec from the flag strings; raises CaptureSpecError naming the field.

    layers: `all` or comma-separated indices (negative count from the end); sites: `all` or a
    comma-separated list; positions, dtype, channel_stats and teacher_logprobs as in the spec;
    summary_only: `summary: true, tensors: false` (the layer analysis' sums, no raw tensors).
    None leaves the
    spec's default.
    """
    kwargs: dict[str, Any] = {}
    if layers is not None and layers.strip().lower() != "all":
        parsed = []
        for item in _split(layers) or [layers]:
            try:
                parsed.append(int(item))
            except ValueError:
                raise CaptureSpecError(
                    "layers", f"{item!r} is not an integer layer index (use e.g. 0,4,8 or all)"
                ) from None
        kwargs["layers"] = parsed
    if sites is not None and sites.strip().lower() != "all":
        kwargs["sites"] = _split(sites)
    if positions is not None:
        kwargs["positions"] = positions.strip()
    if dtype is not None:
        kwargs["dtype"] = dtype.strip()
    if channel_stats is not None:
        kwargs["channel_stats"] = channel_stats
    if teacher_logprobs is not None:
        kwargs["teacher_logprobs"] = teacher_logprobs
    if summary_only:
        kwargs.update(summary=True, tensors=False)
    return CaptureSpec(**kwargs)


def request_body(
    record: Phase1Record,
    mode: str,
    spec: CaptureSpec,
    max_tokens: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The /generate_with_activations body for one record (always the async job flow)."""
    body: dict[str, Any] = {
        "messages": record.messages(),
        "capture": spec.to_dict(),
        "wait": False,
    }
    if mode == "teacher-forced":
        if not record.response:
            raise RecordError(
                "no response to teacher-force (run `actclient phase1 generate` first, or use "
                "--mode generate)"
            )
        body["text"] = record.response
    else:
        body["max_tokens"] = max_tokens or record.max_tokens
        if temperature is not None:
            body["temperature"] = temperature
        if seed is not None:
            body["seed"] = seed
    return body
