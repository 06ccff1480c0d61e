"""scripts/client.py against the real server: batches, results per file, failures reported."""

import json
import subprocess
import sys

import pytest

from helpers import shape_image
from harness.ts_server import ROOT

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("encoding", [[], ["--form-data"]], ids=["multipart-mixed", "form-data"])
def test_client_classifies_a_folder_and_reports_bad_files(server, tmp_path, encoding):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    expected = {}
    for i, label in enumerate(["circle", "square", "triangle"] * 3):
        path = folder / ("sub" if i % 2 else "") / f"{i:02d}_{label}.png"
        path.write_bytes(shape_image(label, 3000 + i, size_range=(0.4, 0.8)))
        expected[str(path)] = server.predict(data=path.read_bytes()).json()
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    out = tmp_path / "results.jsonl"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "client.py"), str(folder), "--batch", "4", "--concurrency", "2",
         "--url", server.inference_url, "--key-file", str(server.workdir / "key_file.json"), "--out", str(out), *encoding],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 1, run.stderr  # one file failed
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 10
    by_path = {line["path"]: line for line in lines}
    broken = by_path.pop(str(folder / "broken.jpg"))
    assert broken["error"] == "invalid_image" and broken["reason"], broken
    assert "broken.jpg" in run.stderr
    assert set(by_path) == set(expected)
    for path, line in by_path.items():
        assert line["scores"] == pytest.approx(expected[path], abs=1e-3), line
        assert line["label"] == next(iter(expected[path]))
    assert "9 classified, 1 failed" in run.stderr
