"""The `actclient record` command: drive Phase 1 records through /generate_with_activations.

Modules: `request` (flags to capture spec, one record's body), `transport` (HTTP: jobs,
downloads, the server pool), `manifest` (the run folder on disk), `run` (the Recorder), `cli`.

For each record the client submits a capture with `wait: false` (the server answers 202 with a
job URL at once, so no request is ever held near a proxy's 100 s cut), polls `GET /jobs/{id}`
until the shard is ready, then streams `GET /shards/{id}` to `OUT/shards/.<name>.h5.part`,
resuming with `Range` after a dropped connection, checks the whole file against the
`X-Content-SHA256` header and the job's sha256, fsyncs and renames it to
`OUT/shards/<name>.h5`. Only then is one line appended (and fsynced) to `OUT/manifest.jsonl`.

Modes: `generate` sends the record's chat messages and generates `max_tokens` tokens;
`teacher-forced` sends the chat messages plus the Phase 1 response as `text`, so the capture
covers exactly the prompt followed by the response and nothing is generated.

Resuming: a rerun skips every record whose last manifest line is `ok` and whose shard file is
present with the recorded size and sha256. A record whose capture finished on the server but
whose download was interrupted (the client was killed) resumes that download from the same
server by `Range` (the job's result is kept in `OUT/shards/.<name>.h5.job.json`), so a kill
loses no finished capture. Requests are retried with backoff and jitter on 429 (honouring
`Retry-After`), 5xx and timeouts; several `--server` URLs share the work, each record going
to the least busy server. The API key is sent only in the Authorization header.
"""

from actclient.record.cli import register
from actclient.record.errors import FatalError, RecordError, ShardGone
from actclient.record.manifest import (
    MANIFEST_NAME,
    SHARDS_DIRNAME,
    read_manifest,
    shard_name,
    shard_verifies,
)
from actclient.record.request import MODES, capture_spec_from_flags, request_body
from actclient.record.run import (
    DEFAULT_CONCURRENCY,
    DEFAULT_TIMEOUT_S,
    Recorder,
    RecordOptions,
    RecordSummary,
    format_summary,
    record,
)

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_TIMEOUT_S",
    "MANIFEST_NAME",
    "MODES",
    "SHARDS_DIRNAME",
    "FatalError",
    "RecordError",
    "RecordOptions",
    "RecordSummary",
    "Recorder",
    "ShardGone",
    "capture_spec_from_flags",
    "format_summary",
    "read_manifest",
    "record",
    "register",
    "request_body",
    "shard_name",
    "shard_verifies",
]
