"""`models/` stays pure: it imports no Ray, Redis or HTTP library, statically or at run time."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("ray", "redis", "fastapi", "starlette", "uvicorn", "httpx", "requests", "aiohttp", "locust",
             "opentelemetry", "services", "infra")


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_models_source_imports_nothing_forbidden():
    files = sorted((ROOT / "models").rglob("*.py"))
    assert files
    offenders = {str(f.relative_to(ROOT)): sorted(_imported_roots(f) & set(FORBIDDEN)) for f in files}
    assert not {k: v for k, v in offenders.items() if v}


def test_importing_every_models_module_loads_no_forbidden_module():
    modules = [".".join(f.relative_to(ROOT).with_suffix("").parts) for f in sorted((ROOT / "models").rglob("*.py"))]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""
