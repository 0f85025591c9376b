"""The throwaway-CA fixture for the TLS tests of every front-end."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.servers import need
from tests.serverkit.tls import ServerCert, ThrowawayCA

__all__ = ["ServerCert", "ThrowawayCA", "tls_ca"]


@pytest.fixture(scope="session")
def tls_ca() -> Iterator[ThrowawayCA]:
    """A throwaway CA for the session (~30 ms), in a temp dir others can read."""
    base = Path(tempfile.mkdtemp(prefix="test-ca-"))
    base.chmod(0o755)
    try:
        yield need(lambda: ThrowawayCA.create(base))
    finally:
        if os.environ.get("KEEP_SERVER_DIRS") != "1":
            shutil.rmtree(base, ignore_errors=True)
