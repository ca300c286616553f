"""The pytest plugin of the conformance kit (loaded through the ``pytest11`` entry point).

It is loaded in every pytest session of an environment where kvplane-core is installed,
so importing it must stay cheap: it imports nothing heavy until a fixture is used.

Options:

- ``--kvplane-platform NAME``: the platform the kit tests (default: the one
  :func:`kvplane.plugins.select_platform` picks, honouring ``KVPLANE_DEVICE``).
- ``--kvplane-emulate``: test the platform through its emulation (it must name one with
  ``--kvplane-platform``); the same as ``KVPLANE_EMULATE=NAME``, which it sets for this
  session and the processes it starts.
- ``--kvplane-seed N``: base seed of the random inputs (default 0); each test derives its
  own seed from it and its name, so a failure reproduces with the same seed.

Fixtures (session scoped unless marked):

- ``kvplane_platform_name``: the requested name, or ``None`` for "whatever is selected".
- ``kvplane_platform``: the resolved :class:`kvplane.plugins.Platform`.
- ``kvplane_device``: ``kvplane_platform.device(0)``.
- ``kvplane_dtypes``: the platform's supported dtypes as torch dtypes.
- ``kvplane_dtype`` (function scoped, parametrized over
  :data:`kvplane.testing.KIT_DTYPES`): one model dtype; skips those the platform lacks.
- ``kvplane_generator`` (function scoped): a CPU ``torch.Generator`` seeded per test.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import pytest

from kvplane.testing import KIT_DTYPES

if TYPE_CHECKING:
    import torch

    from kvplane.plugins import Platform

PLATFORM_OPTION = "--kvplane-platform"
EMULATE_OPTION = "--kvplane-emulate"
SEED_OPTION = "--kvplane-seed"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvplane", "kvplane conformance kit")
    group.addoption(
        PLATFORM_OPTION,
        dest="kvplane_platform",
        default=None,
        metavar="NAME",
        help="kvplane platform the conformance kit tests (default: the selected one, "
        "honouring KVPLANE_DEVICE)",
    )
    group.addoption(
        EMULATE_OPTION,
        dest="kvplane_emulate",
        action="store_true",
        help="test the --kvplane-platform platform through its emulation (a host without "
        "its hardware), as KVPLANE_EMULATE=NAME does",
    )
    group.addoption(
        SEED_OPTION,
        dest="kvplane_seed",
        type=int,
        default=0,
        metavar="N",
        help="base seed of the conformance kit's random inputs (default: 0)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("kvplane_emulate", False):
        return
    import os

    from kvplane.plugins.selection import EMULATE_ENV

    name = config.getoption("kvplane_platform")
    if name is None:
        raise pytest.UsageError(f"{EMULATE_OPTION} needs {PLATFORM_OPTION} NAME")
    # In the environment, so the kit's worker processes emulate the platform too.
    names = [n for n in os.environ.get(EMULATE_ENV, "").split(",") if n.strip()]
    os.environ[EMULATE_ENV] = ",".join([*names, name])


def pytest_report_header(config: pytest.Config) -> list[str]:
    name = config.getoption("kvplane_platform")
    if name is None:
        return []
    how = " (emulated)" if config.getoption("kvplane_emulate") else ""
    seed = config.getoption("kvplane_seed")
    return [f"kvplane conformance kit: platform {name!r}{how}, seed {seed}"]


@pytest.fixture(scope="session")
def kvplane_platform_name(pytestconfig: pytest.Config) -> str | None:
    """The platform name given with ``--kvplane-platform`` (``None``: the selected one)."""
    return pytestconfig.getoption("kvplane_platform")


@pytest.fixture(scope="session")
def kvplane_platform(kvplane_platform_name: str | None) -> Platform:
    """The platform under test, resolved once per session with ``select_platform``."""
    from kvplane.plugins import PlatformSelectionError, select_platform

    try:
        return select_platform(kvplane_platform_name)
    except PlatformSelectionError as error:
        pytest.fail(f"cannot select the kvplane platform under test: {error}", pytrace=False)


@pytest.fixture(scope="session")
def kvplane_device(kvplane_platform: Platform) -> torch.device:
    """Local device 0 of the platform under test."""
    return kvplane_platform.device(0)


@pytest.fixture(scope="session")
def kvplane_dtypes(kvplane_platform: Platform) -> tuple[torch.dtype, ...]:
    """The platform's ``supported_dtypes`` parsed to torch dtypes."""
    from kvplane.testing.helpers import parse_dtype

    return tuple(parse_dtype(name) for name in kvplane_platform.info.supported_dtypes)


@pytest.fixture(params=KIT_DTYPES)
def kvplane_dtype(request: pytest.FixtureRequest, kvplane_platform: Platform) -> torch.dtype:
    """One model dtype per test instance; skipped where the platform does not list it."""
    from kvplane.testing.helpers import parse_dtype

    if request.param not in kvplane_platform.info.supported_dtypes:
        pytest.skip(
            f"platform {kvplane_platform.name!r} does not support {request.param} (list it "
            "in PlatformInfo.supported_dtypes to run these)"
        )
    return parse_dtype(request.param)


@pytest.fixture
def kvplane_generator(request: pytest.FixtureRequest) -> torch.Generator:
    """A CPU generator seeded from ``--kvplane-seed`` and the test's name."""
    import torch

    base_seed = request.config.getoption("kvplane_seed")
    generator = torch.Generator()
    # File name and test name, not the node id: the id depends on the rootdir.
    test_id = f"{request.node.path.name}::{request.node.name}"
    generator.manual_seed(base_seed * 1_000_003 + zlib.crc32(test_id.encode()))
    return generator
