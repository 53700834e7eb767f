"""The layer boundaries of ../shared/STYLE.md, enforced rather than remembered."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "maitred_tx" / "smtp"


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_core_imports_only_stdlib_and_itself() -> None:
    allowed = set(sys.stdlib_module_names) | {"maitred_tx"}
    offenders = []
    for path in CORE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in allowed or (top == "maitred_tx" and not name.startswith(
                        "maitred_tx.smtp")):
                    offenders.append(f"{path.name}: {name}")
    assert offenders == []


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter not installed")
def test_import_contracts() -> None:
    result = _run("lint-imports")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("mypy") is None, reason="mypy not installed")
def test_mypy_strict_core_and_typed_glue() -> None:
    pure_auth = [f"maitred_tx/auth/{m}.py" for m in
                 ("resolver", "spf", "dkim", "arc", "dmarc", "authresults", "headers",
                  "verdictcache", "sign")]
    strict = _run(sys.executable, "-m", "mypy", "--strict", "maitred_tx/smtp",
                  "maitred_tx/outcomes.py", "maitred_tx/envelope.py", *pure_auth,
                  *(f"maitred_tx/mta_sts/{m}.py"
                    for m in ("policy", "enforce", "report", "tlsrpt", "cache")),
                  "maitred_tx/relay/route.py", "maitred_tx/relay/smarthost.py",
                  *(f"maitred_tx/client/{m}.py" for m in
                    ("replies", "extensions", "body", "errors", "message", "transaction",
                     "session", "timeouts")),
                  *(f"maitred_tx/queue/{m}.py" for m in
                    ("store", "schedule", "dsn", "codec", "spool", "files", "cli")))
    assert strict.returncode == 0, strict.stdout
    glue = _run(sys.executable, "-m", "mypy", "maitred_tx")
    assert glue.returncode == 0, glue.stdout


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed")
def test_ruff_clean() -> None:
    result = _run("ruff", "check", "maitred_tx", "tests", "twisted", "benchmarks")
    assert result.returncode == 0, result.stdout


def test_no_init_in_twisted_plugin_dirs() -> None:
    # The dropin must join Twisted's plugin path, never shadow the twisted package.
    assert (ROOT / "twisted" / "plugins" / "maitred_plugin.py").is_file()
    assert not (ROOT / "twisted" / "__init__.py").exists()
    assert not (ROOT / "twisted" / "plugins" / "__init__.py").exists()


def test_library_never_imports_the_global_reactor() -> None:
    offenders = []
    for path in (ROOT / "maitred_tx").rglob("*.py"):
        if path.name == "tap.py":  # twistd's entry point is where the reactor is chosen
            continue
        text = path.read_text()
        if "from twisted.internet import reactor" in text or "internet.reactor" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_nothing_gives_twistd_dev_null_as_its_logfile() -> None:
    # twistd's log file rotates at 1 MB by renaming it: /dev/null would be renamed to
    # /dev/null.1 and replaced by a regular file, breaking every later test (seen here).
    offenders = []
    for path in [*(ROOT / "benchmarks").rglob("*.py"), *(ROOT / "tests").rglob("*.py"),
                 *(ROOT / "maitred_tx").rglob("*.py")]:
        text = path.read_text()
        if path.name == "test_architecture.py":
            continue
        if "--logfile=/dev/null" in text or '"--logfile", "/dev/null"' in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
