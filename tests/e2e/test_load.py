"""A short load run against the real server: nothing lost, nothing mixed up, nothing leaked."""

import pytest

from helpers import load_command

loadtest = load_command("scripts/loadtest.py")
Target, run = loadtest.Target, loadtest.run

pytestmark = pytest.mark.e2e


def test_short_load_has_no_errors_mismatches_or_leaks(server):
    target = Target(server.inference_url, "shapes", server.keys()["inference"], server.process.pid)
    report = run(target, clients=4, seconds=20, max_batch=64)
    assert report["requests_ok"] > 10, report
    assert report["errors"] == {}, report
    assert report["mismatches"] == 0, report
    before, after = report["backend_before"], report["backend_after"]
    assert after["processes"] == before["processes"], report
    assert after["open_fds"] <= before["open_fds"] + 16, report
    assert after["shm_files"] <= before["shm_files"] + 4, report
