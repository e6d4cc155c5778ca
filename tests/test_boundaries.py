"""Who imports whom: the server (`vllm_activations`) and the client (`actclient`) share only the
contract (`vllm_activations.contract`), which imports neither of them nor vllm or torch; the
end-to-end runs (`actpipeline`) are the one place that imports both."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER, CONTRACT = ROOT / "vllm_activations", ROOT / "vllm_activations" / "contract"
CLIENT = ROOT / "client" / "actclient"


def imported_modules(path: Path) -> set[str]:
    """Every absolute module a file imports, at any depth (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            # `from vllm_activations import x` imports the module vllm_activations.x
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def offenders(folder: Path, forbidden, exclude: Path | None = None) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        if exclude is not None and exclude in path.parents:
            continue
        found += [
            f"{path.relative_to(ROOT)} imports {name}"
            for name in sorted(imported_modules(path))
            if forbidden(name)
        ]
    return found


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_contract_imports_neither_side_nor_vllm_or_torch():
    def forbidden(name: str) -> bool:
        if top(name) in {"actclient", "actpipeline", "vllm", "torch"}:
            return True
        if top(name) == "vllm_activations":
            # the package itself (its __init__ only holds the version) and the contract
            return name not in {"vllm_activations", "vllm_activations.__version__"} and not (
                name.startswith("vllm_activations.contract")
            )
        return False

    assert offenders(CONTRACT, forbidden) == []


def test_the_server_never_imports_the_client_or_the_pipeline():
    assert offenders(SERVER, lambda n: top(n) in {"actclient", "actpipeline"}) == []


def test_the_client_imports_only_the_contract_of_the_server():
    def forbidden(name: str) -> bool:
        if top(name) == "actpipeline":
            return True
        return top(name) == "vllm_activations" and not name.startswith("vllm_activations.contract")

    assert offenders(CLIENT, forbidden) == []


def test_the_contract_and_the_client_analysis_import_without_torch_or_vllm():
    code = (
        "import sys\n"
        "import vllm_activations.contract.shard, vllm_activations.contract.spec\n"
        "import vllm_activations.contract.files, vllm_activations.contract.tokens\n"
        "import actclient.analysis.analyze, actclient.record\n"
        "print(sorted(m for m in ('torch', 'vllm') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_checker_sees_lazy_and_from_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\nfrom vllm_activations import capture\n"
        "def f():\n    from actclient.record import main\n"
    )
    names = imported_modules(sample)
    assert {"os", "vllm_activations.capture", "actclient.record"} <= names
