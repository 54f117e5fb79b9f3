"""make test's scheduling (tests/longest_first.py): the next run starts with the tests that took longest."""
import json


def test_the_next_run_starts_with_the_longest_recorded_test(pytester):
    pytester.makeconftest("pytest_plugins = ['tests.longest_first']")
    pytester.makepyfile(test_quick="def test_quick():\n    pass\n",
                        test_long="import time\n\ndef test_long():\n    time.sleep(0.3)\n")

    def order() -> list[str]:
        result = pytester.runpytest("-v")
        result.assert_outcomes(passed=2)
        return [line.split("::")[0] for line in result.outlines if "PASSED" in line]

    assert order() == ["test_long.py", "test_quick.py"]  # no record yet: the files' order (long < quick)
    pytester.makepyfile(test_long="def test_long():\n    pass\n",
                        test_quick="import time\n\ndef test_quick():\n    time.sleep(0.3)\n")
    order()  # records quick as the long one now
    assert order() == ["test_quick.py", "test_long.py"]


def test_without_a_cache_the_committed_record_decides(pytester, monkeypatch):
    from tests import longest_first

    pytester.makeconftest("pytest_plugins = ['tests.longest_first']")
    pytester.makepyfile(test_long="def test_long():\n    pass\n", test_quick="def test_quick():\n    pass\n")
    record = pytester.path / "durations.json"
    record.write_text(json.dumps({"test_quick.py::test_quick": 9.0}))  # as a fresh clone finds tests/durations.json
    monkeypatch.setattr(longest_first, "COMMITTED", record)
    result = pytester.runpytest("-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert [line.split("::")[0] for line in result.outlines if "PASSED" in line] == ["test_quick.py", "test_long.py"]


def test_the_piles_first_tests_share_no_build():
    from tests.longest_first import dealt

    seconds = {"pipeline_a": 90, "pipeline_b": 80, "pipeline_c": 70, "ray": 60, "export": 50, "quick": 1}
    builds = {"pipeline_a": {"baseline"}, "pipeline_b": {"baseline"}, "pipeline_c": {"baseline"}, "ray": {"exported"},
              "export": set(), "quick": {"exported"}}
    order = dealt(list(seconds), 3, seconds.get, builds.get)
    piles = [order[0:2], order[2:4], order[4:6]]
    assert [pile[0] for pile in piles] == ["pipeline_a", "ray", "export"]  # b and c would wait for a's baseline
    assert piles == [["pipeline_a", "pipeline_b"], ["ray", "pipeline_c"], ["export", "quick"]]
    assert dealt(list(seconds), 1, seconds.get, builds.get) == sorted(seconds, key=seconds.get, reverse=True)
