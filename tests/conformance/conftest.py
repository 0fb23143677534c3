"""The conformance suite: every client-visible behaviour, written once, run against every front
end (`frontend` fixture). A front end that is not built fails here; it is never skipped: `make
test` builds the native one."""

from __future__ import annotations

import pytest

from bnserve.server.native_frontend import binary

FRONTENDS = ["python", "native"]


@pytest.fixture(params=FRONTENDS)
def frontend(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    if name == "native":
        assert binary().is_file(), f"the native front end is not built ({binary()}): make native"
    return name
