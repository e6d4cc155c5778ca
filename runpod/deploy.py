"""Create or update the RunPod pod template from runpod/template.json, by name.

Uses RunPod's REST API (v1): list the account's templates, then POST a new one or PATCH the
one with the same name, so running it twice changes nothing the second time. The API key
comes from RUNPOD_API_KEY and is never printed; `--dry-run` prints the requests it would send
(auth header redacted) and sends nothing.

    RUNPOD_API_KEY=... python runpod/deploy.py --image docker.io/you/vllm-activations:0.1.0
    python runpod/deploy.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import httpx

API_URL = "https://rest.runpod.io/v1"
API_KEY_VAR = "RUNPOD_API_KEY"
TEMPLATE_PATH = Path(__file__).with_name("template.json")
IMAGE_PLACEHOLDER = "YOUR_REGISTRY_USER"
REDACTED = "Bearer <redacted>"

# Fields of POST /templates that this script sends (REST v1 TemplateCreateInput).
REQUIRED_FIELDS = frozenset({"name", "imageName"})
CREATE_FIELDS = frozenset(
    {
        "name",
        "imageName",
        "category",
        "containerDiskInGb",
        "volumeInGb",
        "volumeMountPath",
        "ports",
        "env",
        "isPublic",
        "isServerless",
        "readme",
        "dockerEntrypoint",
        "dockerStartCmd",
        "containerRegistryAuthId",
    }
)
# PATCH /templates/{id} (TemplateUpdateInput) cannot change the category or serverless flag.
UPDATE_FIELDS = CREATE_FIELDS - {"category", "isServerless"}
FIELD_TYPES: dict[str, type] = {
    "name": str,
    "imageName": str,
    "category": str,
    "containerDiskInGb": int,
    "volumeInGb": int,
    "volumeMountPath": str,
    "ports": list,
    "env": dict,
    "isPublic": bool,
    "isServerless": bool,
    "readme": str,
    "dockerEntrypoint": list,
    "dockerStartCmd": list,
    "containerRegistryAuthId": str,
}
SECRET_REF_RE = re.compile(r"^\{\{\s*RUNPOD_SECRET_\w+\s*\}\}$")
# Variable names that hold credentials: HF_TOKEN, *_API_KEY, ... (not MAX_PROMPT_TOKENS).
SENSITIVE_NAME_RE = re.compile(r"(?:^|_)(?:KEY|TOKEN|SECRET|PASSWORD|CREDENTIALS?)$", re.I)
PORT_RE = re.compile(r"^\d{1,5}/(http|tcp)$")


class DeployError(Exception):
    """A problem the user can fix; the message says how."""


def validate_template(template: dict[str, Any]) -> None:
    """Check field names and types, and that secrets appear only as RunPod references."""
    unknown = sorted(set(template) - CREATE_FIELDS)
    if unknown:
        raise DeployError(f"template: unknown fields {unknown}; allowed: {sorted(CREATE_FIELDS)}")
    missing = sorted(REQUIRED_FIELDS - set(template))
    if missing:
        raise DeployError(f"template: missing required fields {missing}")
    for field, value in template.items():
        expected = FIELD_TYPES[field]
        if (isinstance(value, bool) and expected is int) or not isinstance(value, expected):
            raise DeployError(f"template.{field}: expected {expected.__name__}, got {value!r}")
    for port in template.get("ports", []):
        if not isinstance(port, str) or not PORT_RE.match(port):
            raise DeployError(f"template.ports: {port!r} is not PORT/http or PORT/tcp")
    for name, value in template.get("env", {}).items():
        if not isinstance(value, str):
            raise DeployError(f"template.env.{name}: values must be strings, got {value!r}")
        if SENSITIVE_NAME_RE.search(name) and value and not SECRET_REF_RE.match(value):
            raise DeployError(
                f"template.env.{name}: looks like a secret but is a literal value; store it as "
                "a RunPod secret and use '{{ RUNPOD_SECRET_<name> }}' instead"
            )


def load_template(path: Path, image: str | None, name: str | None) -> dict[str, Any]:
    try:
        template = json.loads(path.read_text())
    except FileNotFoundError:
        raise DeployError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise DeployError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(template, dict):
        raise DeployError(f"{path}: expected a JSON object")
    if image:
        template["imageName"] = image
    if name:
        template["name"] = name
    validate_template(template)
    return template


def update_body(template: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in template.items() if k in UPDATE_FIELDS}


def _templates_from(payload: Any) -> list[dict[str, Any]]:
    if isinstance(payload, dict):
        payload = payload.get("templates", payload.get("data"))
    if not isinstance(payload, list):
        raise DeployError("RunPod: unexpected answer to GET /templates (expected a list)")
    return [t for t in payload if isinstance(t, dict)]


def _check(response: httpx.Response, what: str) -> Any:
    if response.status_code in (401, 403):
        raise DeployError(
            f"RunPod refused {what} ({response.status_code}): check that {API_KEY_VAR} is a "
            "valid key with read/write access (console: Settings, API Keys)"
        )
    if response.is_error:
        raise DeployError(
            f"RunPod: {what} failed with HTTP {response.status_code}: {response.text[:500]}"
        )
    try:
        return response.json()
    except ValueError:
        raise DeployError(f"RunPod: {what} answered non-JSON: {response.text[:200]!r}") from None


def upsert(client: httpx.Client, template: dict[str, Any]) -> tuple[str, str]:
    """Create or update the template named template['name']; returns (action, id)."""
    name = template["name"]
    listing = _templates_from(_check(client.get("/templates"), "listing templates"))
    existing = [t for t in listing if t.get("name") == name]
    if len(existing) > 1:
        raise DeployError(f"RunPod: {len(existing)} templates are named {name!r}; delete extras")
    if existing:
        template_id = existing[0].get("id")
        if not template_id:
            raise DeployError(f"RunPod: template {name!r} has no id in the listing")
        _check(client.patch(f"/templates/{template_id}", json=update_body(template)), "update")
        return "updated", str(template_id)
    created = _check(client.post("/templates", json=template), "create")
    return "created", str(created.get("id", "?") if isinstance(created, dict) else "?")


def dry_run_requests(template: dict[str, Any], api_url: str) -> list[dict[str, Any]]:
    """The requests `upsert` may send, with the auth header redacted."""
    headers = {"Authorization": REDACTED}
    json_headers = {**headers, "Content-Type": "application/json"}
    name = template["name"]
    return [
        {"when": "always", "method": "GET", "url": f"{api_url}/templates", "headers": headers},
        {
            "when": f"no template is named {name!r}",
            "method": "POST",
            "url": f"{api_url}/templates",
            "headers": json_headers,
            "json": template,
        },
        {
            "when": f"a template named {name!r} exists (its id from the listing)",
            "method": "PATCH",
            "url": f"{api_url}/templates/{{templateId}}",
            "headers": json_headers,
            "json": update_body(template),
        },
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Create or update the vllm-activations RunPod template (by name).",
    )
    parser.add_argument("--template", type=Path, default=TEMPLATE_PATH, help="template JSON")
    parser.add_argument("--image", help="image to run, e.g. docker.io/you/vllm-activations:0.1.0")
    parser.add_argument("--name", help="template name (default: the JSON's name)")
    parser.add_argument("--api-url", default=API_URL, help=f"REST API base (default {API_URL})")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the requests and send nothing"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    api_url = args.api_url.rstrip("/")
    try:
        template = load_template(args.template, args.image, args.name)
        placeholder = IMAGE_PLACEHOLDER in template["imageName"]
        if args.dry_run:
            if placeholder:
                print(
                    f"deploy: note: imageName is the placeholder {template['imageName']!r}; "
                    "pass --image with the image you pushed",
                    file=sys.stderr,
                )
            print(json.dumps(dry_run_requests(template, api_url), indent=2))
            print("deploy: dry run, nothing was sent", file=sys.stderr)
            return 0
        if placeholder:
            raise DeployError(
                f"imageName is the placeholder {template['imageName']!r}: build and push the "
                "image (runpod/GUIDE.md), then pass --image REGISTRY/USER/vllm-activations:TAG"
            )
        api_key = os.environ.get(API_KEY_VAR, "").strip()
        if not api_key:
            raise DeployError(
                f"{API_KEY_VAR} is not set: create an API key in the RunPod console "
                "(Settings, API Keys) and export it"
            )
        with httpx.Client(
            base_url=api_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(30.0, connect=10.0),
        ) as client:
            action, template_id = upsert(client, template)
    except DeployError as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        # httpx messages hold the URL, never the headers.
        print(f"deploy: cannot reach {api_url}: {exc}", file=sys.stderr)
        return 1
    print(f"deploy: {action} template {template['name']!r} (id {template_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
