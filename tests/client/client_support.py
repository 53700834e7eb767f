"""Helpers shared by the client's real-socket tests (imported from tests/client, which
conftest.py puts on sys.path)."""

from __future__ import annotations

from typing import Any

from maitred_tx.smtp.config import AuthChecks, Config, Mode

NO_CHECKS = AuthChecks(enabled=False)  # no SPF/DKIM/DMARC lookups in these tests
LOCAL = frozenset({"example.com"})


def maitred_config(mode: Mode = Mode.MX, **kw: Any) -> Config:
    """A maitred_tx listener for mx.test accepting mail for example.com, unchecked."""
    return Config(hostname="mx.test", local_domains=LOCAL, mode=mode, auth_checks=NO_CHECKS,
                  **kw)
