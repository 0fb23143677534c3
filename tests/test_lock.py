"""The locks (requirements-serve.txt, requirements-test.txt; `make lock`) pin every package with
hashes, satisfy pyproject.toml's ranges, agree with each other, and are what this venv holds."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SERVE_LOCK, TEST_LOCK = ROOT / "requirements-serve.txt", ROOT / "requirements-test.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def pins(lock: Path) -> dict[str, tuple[Version, int]]:
    """{canonical name: (pinned version, number of hashes)} of a pip-compile lock."""
    out: dict[str, tuple[Version, int]] = {}
    name = None
    for line in lock.read_text().splitlines():
        if m := PIN.match(line):
            name = canonicalize_name(m.group(1))
            assert name not in out, f"{lock.name}: {name} pinned twice"
            out[name] = (Version(m.group(2)), 0)
        elif name and line.strip().startswith("--hash=sha256:"):
            out[name] = (out[name][0], out[name][1] + 1)
        elif line and not line.startswith((" ", "#")):
            pytest.fail(f"{lock.name}: a line that is not a hashed pin: {line!r}")
    return out


def project() -> dict:  # type: ignore[type-arg]
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(extras: list[str]) -> list[Requirement]:
    """pyproject's dependencies plus those of `extras`, with `bnserve[x]` expanded."""
    proj = project()
    reqs = [Requirement(r) for r in proj["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for r in map(Requirement, proj["optional-dependencies"][extra]):
            if canonicalize_name(r.name) == "bnserve":
                todo += sorted(r.extras)
            else:
                reqs.append(r)
    return reqs


@pytest.mark.parametrize(
    ("lock", "extras"), [(SERVE_LOCK, []), (TEST_LOCK, ["test", "client"])], ids=["serve", "test"]
)
def test_lock_pins_every_requirement_within_its_range(lock: Path, extras: list[str]) -> None:
    locked = pins(lock)
    assert locked and all(n_hashes >= 1 for _, n_hashes in locked.values()), lock.name
    assert "bnserve" not in locked
    assert "torch" not in pins(SERVE_LOCK), "the serving install needs no torch"
    for req in requirements(extras):
        name = canonicalize_name(req.name)
        assert name in locked, f"{lock.name} lacks {req}"
        version = locked[name][0]
        assert req.specifier.contains(version, prereleases=True), f"{lock.name}: {version} vs {req}"
    # bnserve's build backend is locked too (the Makefile installs bnserve without isolation)
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    for req in map(Requirement, build):
        assert req.specifier.contains(locked[canonicalize_name(req.name)][0])


def test_test_lock_agrees_with_the_serving_lock() -> None:
    serve, test = pins(SERVE_LOCK), pins(TEST_LOCK)
    assert set(serve) <= set(test)
    assert {n: v for n, (v, _) in serve.items()} == {n: test[n][0] for n in serve}


def test_this_venv_holds_exactly_the_test_lock() -> None:
    """`make test` installed from the lock: every locked package at its pinned version."""
    wrong = {}
    for name, (version, _) in pins(TEST_LOCK).items():
        try:
            have = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            have = None
        if have != version:
            wrong[name] = (str(version), have and str(have))
    assert not wrong, f"(locked, installed): {wrong}"
