"""The README and the RunPod GUIDE against the code: every `actclient` command they show
parses with the real parser, every relative link names a file in the repository, and the
GUIDE covers what a user needs to finish the job from it alone (pod lifecycle, cost, getting
the results off the pod, building on an ARM laptop, the model snapshot for analyze)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from actclient.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "runpod" / "GUIDE.md"]


def _code_lines(path: Path) -> list[str]:
    """Lines of the ```bash blocks, `\\` continuations joined."""
    lines, inside, pending = [], False, ""
    for line in path.read_text().splitlines():
        fence = line.strip()
        if fence.startswith("```"):
            inside = fence == "```bash"
            continue
        if not inside:
            continue
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        lines.append(line)
    return lines


def _actclient_commands() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for line in _code_lines(path):
            if not re.match(r"(\$ )?actclient ", line):
                continue
            words = shlex.split(line.removeprefix("$ "), comments=True)
            cut = [i for i, w in enumerate(words) if w in ("&&", ";", "|", ">", "2>")]
            found.append((path.name, shlex.join(words[: cut[0]] if cut else words)))
    return found


def test_the_docs_show_actclient_commands():
    commands = {c.split()[1] for _, c in _actclient_commands()}
    assert {"phase1", "record", "analyze", "plan", "prune", "evaluate"} <= commands


@pytest.mark.parametrize("doc, command", _actclient_commands())
def test_every_actclient_command_in_the_docs_parses(doc, command, capsys):
    try:
        args = build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit:
        pytest.fail(f"{doc}: `{command}` does not parse: {capsys.readouterr().err.strip()}")
    assert getattr(args, "func", None), f"{doc}: `{command}` names no command"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_name_files_in_the_repository(doc):
    text = doc.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
    for name in re.findall(r"\b([A-Z][A-Z_]+\.md)\b", text):
        assert list(ROOT.glob(f"**/{name}")), f"{doc.name} names {name}, not in the repository"


def test_the_guide_takes_a_user_through_the_whole_job():
    guide = (ROOT / "runpod" / "GUIDE.md").read_text()
    flat = " ".join(guide.split())
    # Pod lifecycle with runpodctl and the REST API; terminating deletes the volume disk.
    for command in ("runpodctl create pod", "runpodctl stop pod", "runpodctl remove pod"):
        assert command in guide, command
    assert "rest.runpod.io/v1/pods" in guide and "DELETE" in guide
    assert re.search(r"terminat\w+ [^.]*deletes? [^.]*volume", flat, re.IGNORECASE)
    # A cost sketch: the GPU price is the user's input, storage per GB-month running/stopped.
    assert "GB-month" in guide and re.search(r"\bP\b", flat)
    assert re.search(r"stopped", flat) and re.search(r"running", flat)
    # Getting shards and the analysis off the pod.
    for way in ("--delete-remote", "runpodctl send", "network volume", "/shards/"):
        assert way in guide, way
    # Building the image on an ARM laptop.
    assert "--platform linux/amd64" in guide
    # analyze with --model, and where the snapshot lives on the pod.
    assert re.search(r"actclient analyze \S+ --out \S+ --model ", guide)
    assert "/workspace/hf/hub/models--" in guide and "/snapshots/" in guide
    # No claims the code does not back.
    assert "DESIGN.md" not in guide and "disk-bound" not in flat
    assert "CPU-bound" in flat


def test_the_readme_names_the_plots_extra_the_pictures_need():
    readme = (ROOT / "README.md").read_text()
    assert "pip install '.[plots]'" in readme
    extras = (ROOT / "pyproject.toml").read_text()
    assert re.search(r"^plots = \[.*matplotlib", extras, re.MULTILINE)
