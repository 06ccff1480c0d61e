"""The README's "Serving your own model" recipes, run as written: the commands between each
``<!-- recipe: NAME -->`` marker and its end, in a fresh directory, after the download (the first
block: no hub is reachable here) is replaced by a folder of the same name built offline."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess

import pytest

from handler.model.files import read_model
from handler.model.zoo import imagenet_labels
from harness.ts_server import ROOT
from harness.zoo_folders import hf_folder, timm_folder

pytestmark = pytest.mark.e2e

RECIPE = re.compile(r"<!-- recipe: (\w+) -->(.*?)<!-- /recipe -->", re.S)
BLOCK = re.compile(r"```bash\n(.*?)```", re.S)


def recipes() -> dict[str, list[list[str]]]:
    """Each recipe's code blocks, as lists of command lines."""
    text = (ROOT / "README.md").read_text()
    return {name: [block.strip().splitlines() for block in BLOCK.findall(body)] for name, body in RECIPE.findall(text)}


def offline_download(command: str, workdir):
    """The folder ``hf download REPO ... --local-dir DIR`` would write, built offline."""
    words = shlex.split(command)
    assert words[:2] == ["hf", "download"], command
    repo, folder = words[2], workdir / words[words.index("--local-dir") + 1]
    if repo.startswith("timm/"):
        return timm_folder(folder, repo.removeprefix("timm/"), num_classes=1000, labels=None, sensitive=False)
    assert repo == "google/vit-base-patch16-224", repo
    return hf_folder(folder, "vit", num_labels=1000, labels=imagenet_labels(), sensitive=False)


def test_the_readme_has_both_recipes():
    assert set(recipes()) == {"timm", "transformers"}


@pytest.mark.parametrize("name", ["timm", "transformers"])
def test_readme_recipe_runs_as_written(name, tmp_path):
    download, *blocks = recipes()[name]
    assert len(download) == 1
    folder = offline_download(download[0], tmp_path)
    # The commands use paths relative to the checkout: give them the checkout's.
    for part in ("scripts", "tests", ".venv"):
        (tmp_path / part).symlink_to(ROOT / part)
    # Eager (as on a machine without a C++ compiler): compiling a 1,000-class model's batch sizes
    # would only lengthen the test; compiled zoo models are tested in the unit tests.
    env = {**os.environ, "CXX": "/nonexistent/c++"}
    printed = ""
    for line in (line for block in blocks for line in block):
        done = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, (line, done.stderr[-3000:])
        printed += done.stderr
    # What the README says build_mar prints for these folders' preprocessing.
    found = {"timm": "shorter side to 235, centre 224 crop (bicubic", "transformers": "stretched to 224x224 (bilinear"}
    assert found[name] in printed, printed[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == len(list((ROOT / "tests" / "data").glob("*.jpg")))
    assert all(next(iter(row["scores"])) in imagenet_labels() for row in rows), rows
    archive = tmp_path / "model_store" / f"{folder.name}.mar"
    spec = read_model(archive)
    assert spec.name == folder.name and spec.config.arch == name and spec.labels == imagenet_labels()
