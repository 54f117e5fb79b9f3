"""Longest tests first on every xdist worker, so that `make test` starts the few long end-to-end tests at once
instead of finishing on one of them alone. `--dist worksteal` gives each of the n workers a contiguous n-th of
the collected tests (and idle workers steal from the others' tails), so the tests are dealt like cards, longest
first, into n piles laid one after the other: each worker's share starts with its longest tests.

Each run records every test's duration (setup + call + teardown) in pytest's cache; the next run sorts by it. A
fresh clone (CI) has no cache: it sorts by tests/durations.json, a run's record committed with the tests; a test
in neither goes by its `slow` marker. Only the order changes, never what runs.

Tests that start from one shared build (a `built_once` fixture: the first to need it builds it, the others wait)
are not laid at the head of two piles: two workers would wait for the one building it, leaving a core idle.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

CACHE_KEY = "transfer_learning/test-seconds"
UNRECORDED_SLOW_SECONDS = 60.0
COMMITTED = Path(__file__).with_name("durations.json")
SHARED_SCOPES = ("session", "module")
Test = TypeVar("Test")


def recorded(config: pytest.Config) -> dict[str, float]:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and CACHE_KEY in workerinput:
        return workerinput[CACHE_KEY]  # the controller's copy: every xdist worker must collect the same order
    cache = getattr(config, "cache", None)
    seconds = cache.get(CACHE_KEY, None) if cache is not None else None
    if seconds is None and COMMITTED.is_file():
        seconds = json.loads(COMMITTED.read_text())
    return seconds or {}


def dealt(tests: Sequence[Test], workers: int, seconds: Callable[[Test], float],
          builds: Callable[[Test], set[Hashable]]) -> list[Test]:
    """`tests` longest first, dealt into `workers` piles laid one after the other; the piles' first tests share
    no build."""
    ordered = sorted(tests, key=seconds, reverse=True)  # stable: ties keep the files' order
    heads: list[Test] = []
    taken: set[Hashable] = set()
    for test in ordered:
        if len(heads) == workers:
            break
        if not builds(test) & taken:
            heads.append(test)
            taken |= builds(test)
    ordered = heads + [test for test in ordered if not any(test is head for head in heads)]
    return [test for pile in range(workers) for test in ordered[pile::workers]]


def shared_builds(item: pytest.Item) -> set[Hashable]:
    """The project's session- and module-scoped fixtures the test needs, directly or through others."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return set()
    return {name for name, defs in info.name2fixturedefs.items()
            if defs and defs[-1].baseid and defs[-1].scope in SHARED_SCOPES}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seconds = recorded(config)

    def expected(item: pytest.Item) -> float:
        if item.nodeid in seconds:
            return seconds[item.nodeid]
        return UNRECORDED_SLOW_SECONDS if item.get_closest_marker("slow") else 0.0

    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    items[:] = dealt(items, workers, expected, shared_builds)


class DurationRecorder:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        cache = getattr(session.config, "cache", None)
        if cache is not None and self.seconds:
            cache.set(CACHE_KEY, {**recorded(session.config), **self.seconds})


class SameOrderOnEveryWorker:
    def pytest_configure_node(self, node) -> None:  # pytest-xdist's hook, on the controller, once per worker
        node.workerinput[CACHE_KEY] = recorded(node.config)


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controller sees every worker's reports; workers record nothing
        config.pluginmanager.register(DurationRecorder(), "longest-first-recorder")
        if config.pluginmanager.hasplugin("xdist"):  # its hook is unknown to pytest without xdist
            config.pluginmanager.register(SameOrderOnEveryWorker(), "longest-first-xdist")
