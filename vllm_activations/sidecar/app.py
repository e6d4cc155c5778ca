"""The sidecar's FastAPI app: capture, jobs, shard download, the /v1 passthrough and health.

Auth is one bearer-key dependency on a router that holds every route but /health, so a new
route cannot forget it. Captures are admitted in a fixed order, each step able to refuse
before anything exists: validate and tokenize (400/413), free disk after every admitted
capture's shard (507), a concurrency slot (429); only then is a job created or vLLM called.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import Receive, Scope, Send

from vllm_activations import __version__
from vllm_activations.announce import Announcements
from vllm_activations.contract.spec import (
    CAPTURE_ID_RE,
    SLOT_FLAGS,
    CaptureSpec,
    busy_slots_message,
    no_slots_message,
)
from vllm_activations.openai_capture import CaptureFailed
from vllm_activations.sidecar import passthrough
from vllm_activations.sidecar.errors import ApiError, install_error_handlers
from vllm_activations.sidecar.generate import (
    CaptureRunner,
    capture_failure,
    shard_disk_bytes,
    stop_string_params,
    unreachable,
    vllm_error,
)
from vllm_activations.sidecar.jobs import CaptureSlots, JobRegistry
from vllm_activations.sidecar.schemas import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    JobAccepted,
    JobStatus,
    ShardList,
    ShardListItem,
)
from vllm_activations.sidecar.settings import (
    LIMIT_FLAGS,
    Settings,
    key_matches,
    vllm_keepalive_expiry,
)
from vllm_activations.sidecar.store import ShardStore, validate_shard_id

# Hop-by-hop headers and ones httpx/uvicorn set themselves are not forwarded.
_DROP_REQUEST_HEADERS = {
    "host",
    "authorization",
    "content-length",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "upgrade",
    "te",
    "proxy-authorization",
}
_DROP_RESPONSE_HEADERS = {
    "content-length",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "upgrade",
    "date",
    "server",
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse}
    for code in (400, 401, 404, 409, 413, 422, 429, 500, 502, 503, 507)
}

bearer = HTTPBearer(auto_error=False, description="an API key of this server")
# The id rule is stated in the schema and checked by validate_shard_id (400 naming the field).
IdPath = Path(
    description="a shard, job or capture id", json_schema_extra={"pattern": CAPTURE_ID_RE.pattern}
)


async def require_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    if credentials is None or not key_matches(credentials.credentials, keys):
        raise ApiError(
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
            "Authorization",
            {"WWW-Authenticate": "Bearer"},
        )


def _retry_later(settings: Settings, full: str, field_prefix: str) -> ApiError:
    """429 for a full server: every capture slot, or every device slot of kind `full`."""
    retry = {"Retry-After": str(settings.retry_after_s)}
    if full == "captures":
        return ApiError(
            429,
            f"the server is running its maximum of {settings.limits.max_concurrent_captures} "
            f"concurrent captures; retry later (raise it with `vllm-activations serve "
            f"{LIMIT_FLAGS['max_concurrent_captures']}`)",
            headers=retry,
        )
    field = f"{field_prefix}{full}"
    message = busy_slots_message(full, settings.device_slots[full])
    return ApiError(429, f"{field}: {message}", field, headers=retry)


def _take_slots(
    slots: CaptureSlots, settings: Settings, spec: CaptureSpec, field_prefix: str
) -> list[str]:
    """A capture slot and the device slots `spec` needs (one of each kind in SLOT_FLAGS it
    asks for; returned, for `slots.release`), or the error: 400 for a kind this server keeps
    no slots of (the connector would refuse it after generating), 429 when all are busy."""
    kinds = [kind for kind in SLOT_FLAGS if getattr(spec, kind)]
    for kind in kinds:
        if settings.device_slots.get(kind) == 0:
            field = f"{field_prefix}{kind}"
            raise ApiError(400, f"{field}: {no_slots_message(kind)}", field)
    full = slots.try_acquire(kinds)
    if full is not None:
        raise _retry_later(settings, full, field_prefix)
    return kinds


def create_app(settings: Settings) -> FastAPI:
    """The sidecar app for one vLLM server and its shard directory."""
    store = ShardStore(settings.shard_dir)
    slots = CaptureSlots(settings.limits.max_concurrent_captures, settings.device_slots)
    jobs = JobRegistry(settings.max_finished_jobs)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # vLLM is on loopback: a refused connection fails at once, and a slow accept means its
        # API server is busy (64 concurrent captures on 2 cores took over 10 s), not gone.
        timeout = httpx.Timeout(settings.request_timeout_s)
        limits = httpx.Limits(
            max_connections=None,
            max_keepalive_connections=64,
            keepalive_expiry=vllm_keepalive_expiry(),  # closed before vLLM closes them
        )
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            app.state.client = client
            app.state.runner = CaptureRunner(settings, client, store)
            announcements = Announcements(store.root)
            if announcements.start():
                app.state.runner.announcements = announcements
            tokenizer = asyncio.create_task(app.state.runner.enable_local_tokenizer())
            try:
                yield
            finally:
                tokenizer.cancel()
                await jobs.cancel_all()
                announcements.close()

    app = FastAPI(
        title="vllm-activations",
        version=__version__,
        description="Generate with vLLM and capture every decoder layer's residual stream "
        "into a downloadable HDF5 shard. Every route except /health needs "
        "'Authorization: Bearer <key>'.",
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.jobs = jobs
    app.state.slots = slots
    install_error_handlers(app)
    api = APIRouter(dependencies=[Depends(require_key)], responses=_ERRORS)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health(request: Request) -> Any:
        """Ready (200) only when vLLM behind the sidecar answers its own /health and the
        sidecar has settled who tokenizes (its own copy of the tokenizer, or vLLM)."""
        client: httpx.AsyncClient = request.app.state.client
        runner: CaptureRunner = request.app.state.runner
        try:
            r = await client.get(f"{settings.vllm_url}/health", timeout=5.0)
            vllm_ready = r.status_code == 200
        except httpx.HTTPError:
            vllm_ready = False
        ready = vllm_ready and runner.tokenizer != "checking"
        body = Health(
            status="ok" if ready else "starting",
            vllm="ready" if vllm_ready else "not ready",
            tokenizer=runner.tokenizer,
        )
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    @api.post(
        "/generate_with_activations",
        response_model=GenerateResponse,
        responses={202: {"model": JobAccepted, "description": "accepted (`wait: false`)"}},
    )
    async def generate_with_activations(body: GenerateRequest, request: Request) -> Any:
        """Generate (or teacher-force) with capture; answers when the shard is complete and
        hashed, or at once with 202 and a job URL when `wait` is false."""
        runner: CaptureRunner = request.app.state.runner
        spec = runner.parse(body)
        kinds = _take_slots(slots, settings, spec, "capture.")  # before vLLM is asked anything
        try:
            prepared = await runner.prepare(body, spec)
            promised = runner.reserve_disk(prepared)
        except BaseException:
            slots.release(kinds)
            raise

        async def work() -> GenerateResponse:
            try:
                return await runner.execute(prepared)
            finally:
                slots.release(kinds)
                runner.disk.release(promised)

        if body.wait:
            return await work()

        job = jobs.start(prepared.capture_id, work, _job_error)
        accepted = JobAccepted(
            id=job.id,
            status="running",
            job_url=f"/jobs/{job.id}",
            shard_url=f"/shards/{job.id}",
        )
        return JSONResponse(
            accepted.model_dump(), status_code=202, headers={"Location": accepted.job_url}
        )

    @api.get("/jobs/{job_id}", response_model=JobStatus)
    async def get_job(job_id: Annotated[str, IdPath]) -> JobStatus:
        """A background capture's status; when succeeded, `result` is the full response."""
        validate_shard_id(job_id)
        job = jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job with id {job_id!r}", "id")
        return JobStatus(
            id=job.id,
            status=job.status,
            created=job.created,
            finished=job.finished,
            result=job.result,
            error=job.error,
        )

    @api.get(
        "/shards/{shard_id}",
        response_class=FileResponse,
        responses={
            200: {"content": {"application/x-hdf5": {}}, "description": "the shard file"},
            206: {"content": {"application/x-hdf5": {}}, "description": "a byte range"},
        },
    )
    async def get_shard(shard_id: Annotated[str, IdPath]) -> FileResponse:
        """Download a shard. Supports `Range`; `X-Content-SHA256` is the whole file's hash."""
        path = store.existing(shard_id)
        sha256 = await asyncio.to_thread(store.sha256, path)
        return FileResponse(
            path,
            media_type="application/x-hdf5",
            filename=path.name,
            headers={"X-Content-SHA256": sha256, "X-Shard-Id": shard_id},
        )

    @api.delete("/shards/{shard_id}", status_code=204, response_class=Response)
    async def delete_shard(shard_id: Annotated[str, IdPath]) -> Response:
        """Delete a shard file (409 while its capture is still running)."""
        validate_shard_id(shard_id)
        if shard_id in jobs.running_ids():
            raise ApiError(409, f"shard {shard_id!r} is still being captured", "id")
        store.delete(shard_id)
        jobs.forget(shard_id)
        return Response(status_code=204)

    @api.get("/shards", response_model=ShardList)
    async def list_shards(
        after: Annotated[
            str | None,
            Query(
                description="list ids after this one",
                json_schema_extra={"pattern": CAPTURE_ID_RE.pattern},
            ),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> ShardList:
        """Complete shards in id order, one page at a time."""
        entries, next_after = await asyncio.to_thread(store.list, after, limit)
        return ShardList(
            shards=[
                ShardListItem(
                    id=e.id,
                    url=f"/shards/{e.id}",
                    bytes=e.bytes,
                    modified=e.modified,
                    sha256=e.sha256,
                )
                for e in entries
            ],
            next_after=next_after,
        )

    async def openai_passthrough(path: str, request: Request) -> Response:
        """Forwarded to vLLM unchanged, streaming included. A request carrying
        `kv_transfer_params.capture` is admitted like /generate_with_activations (limits 413,
        disk 507, a slot 429), answered once its shard is written, with the shard's id, URL,
        size and sha256 in `kv_transfer_params`."""
        client: httpx.AsyncClient = request.app.state.client
        content = await request.body()
        capture = passthrough.capture_body(content)
        if capture is not None:
            return await openai_capture(request, path, capture)
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST_HEADERS
        }
        upstream = client.build_request(
            request.method,
            f"{settings.vllm_url}/v1/{path}",
            params=request.query_params,
            headers=headers,
            content=content,
        )
        try:
            response = await client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            raise unreachable(exc) from exc
        return _UpstreamResponse(
            response.aclose,
            response.aiter_raw(),
            status_code=response.status_code,
            headers={
                k: v for k, v in response.headers.items() if k.lower() not in _DROP_RESPONSE_HEADERS
            },
        )

    async def openai_capture(request: Request, path: str, body: dict[str, Any]) -> Response:
        runner: CaptureRunner = request.app.state.runner
        spec, capture_id = passthrough.parse(runner, request.method, path, body)
        kinds = _take_slots(slots, settings, spec, f"{passthrough.PARAMS}.capture.")
        try:
            admitted = await passthrough.admit(runner, path, body, spec, capture_id)
            promised = runner.reserve_disk_bytes(
                shard_disk_bytes(admitted.spec, admitted.estimated_bytes, settings)
            )
        except BaseException:
            slots.release(kinds)
            raise
        try:
            try:
                r = await request.app.state.client.post(
                    f"{settings.vllm_url}/v1/{path}", json=admitted.body
                )
            except httpx.HTTPError as exc:
                raise unreachable(exc) from exc
            if r.status_code != 200:
                raise vllm_error(r)
            completion = r.json()
            params = stop_string_params(completion, admitted.capture_id, runner.store)
            if "capture_error" in params:  # refused by the connector: as on the generate route
                error = capture_failure(
                    CaptureFailed(params["capture_error"]),
                    runner.store.root,
                    settings.retry_after_s,
                )
                if error.field is not None:
                    error.field = f"{passthrough.PARAMS}.{error.field}"
                raise error
            if "shard_path" in params:
                shard = await runner.wait_and_describe(params)
                completion[passthrough.PARAMS] = passthrough.public_params(params, shard)
            return JSONResponse(completion)
        finally:
            slots.release(kinds)
            runner.disk.release(promised)

    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        api.add_api_route(
            "/v1/{path:path}",
            openai_passthrough,
            methods=[method],
            operation_id=f"openai_passthrough_{method.lower()}",
            summary="vLLM's OpenAI-compatible API, passed through (streaming included)",
            response_class=StreamingResponse,
        )

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_schema() -> JSONResponse:
        """The schema is served behind the key like every other route but /health."""
        return JSONResponse(app.openapi())

    app.include_router(api)
    generated_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            state_server_limits(generated_openapi(), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def state_server_limits(schema: dict[str, Any], settings: Settings) -> None:
    """Write this server's model and limits into its schema: the layer index range, the
    `--max-tokens-limit` maximum and the `--max-logprobs` one (limits on tokens and bytes
    depend on the tokenizer and are answered with 413)."""
    components = schema["components"]["schemas"]
    n = settings.num_layers
    for branch in components["CaptureRequest"]["properties"]["layers"]["anyOf"]:
        if branch.get("type") == "array":
            branch["items"].update(minimum=-n, maximum=n - 1)
    components["GenerateRequest"]["properties"]["max_tokens"]["maximum"] = (
        settings.limits.max_tokens
    )
    teacher = components["CaptureRequest"]["properties"].get("teacher_logprobs")
    if teacher is not None:  # K from 1 to this server's --max-logprobs, or null for none
        k: dict[str, Any] = {"type": "integer", "minimum": 1}
        if settings.max_logprobs > 0:
            k["maximum"] = settings.max_logprobs
        for key in ("type", "minimum", "maximum"):
            teacher.pop(key, None)
        teacher["anyOf"] = [k, {"type": "null"}]


class _UpstreamResponse(StreamingResponse):
    """A streamed vLLM response that always closes upstream, also when the client disconnects
    (Starlette skips `background` tasks then)."""

    def __init__(self, on_close: Callable[[], Awaitable[None]], *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


def _job_error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ApiError):
        return exc.body()["error"]
    return {"status": 500, "field": None, "message": f"{type(exc).__name__}: {exc}"}
