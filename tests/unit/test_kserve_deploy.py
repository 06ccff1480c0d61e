"""deploy/kserve: the door's Dockerfile, entrypoint and InferenceServices agree with each other and the repo.

No cluster and no container engine here: the manifests are read as YAML, the Dockerfile as text, and
the entrypoint and the image's CMD are run with a stand-in `python` that records its arguments.
"""

import json
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KSERVE = ROOT / "deploy" / "kserve"
DOCKERFILE = KSERVE / "Dockerfile"
ENTRYPOINT = KSERVE / "entrypoint.sh"
DOOR_MANIFESTS = ["inferenceservice-door.yaml", "inferenceservice-door-gpu.yaml"]
LEGACY_MANIFESTS = ["inferenceservice-cpu.yaml", "inferenceservice-gpu.yaml"]
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts STORAGE_URI
PINNED = ("torch", "torchvision", "kserve")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends in a continuation line"
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def only(instructions: list[tuple[str, str]], keyword: str) -> str:
    found = [rest for k, rest in instructions if k == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {found}"
    return found[0]


def exposed_ports() -> set[int]:
    return {int(p.split("/")[0]) for _, rest in final_stage() if _ == "EXPOSE" for p in rest.split()}


def flags(argv: list[str]) -> dict[str, str]:
    """--name value and --name=value forms -> {name: value}; a repeated flag is an error here."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        assert arg.startswith("--"), f"unexpected positional argument {arg!r} in {argv}"
        if "=" in arg:
            name, value = arg[2:].split("=", 1)
            i += 1
        else:
            name, value = arg[2:], argv[i + 1]
            i += 2
        assert name not in out, f"--{name} given twice in {argv}"
        out[name] = value
    return out


def cmd_argv() -> list[str]:
    """The image's CMD: exec form ["/bin/sh", "-c", "<command line>"]."""
    cmd = json.loads(only(final_stage(), "CMD"))
    assert cmd[:2] == ["/bin/sh", "-c"], cmd
    return cmd


def cmd_door_flags() -> dict[str, str]:
    words = shlex.split(cmd_argv()[2])
    if words[0] == "exec":
        words = words[1:]
    assert words[:3] == ["python", "-m", "handler.doors.kserve_door"], words
    return flags(words[3:])


def load_manifest(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((KSERVE / name).read_text()) if d is not None]
    assert len(docs) == 1, f"{name}: expected one document, found {len(docs)}"
    return docs[0]


def door_container(isvc: dict) -> dict:
    containers = isvc["spec"]["predictor"]["containers"]
    assert len(containers) == 1
    return containers[0]


def requirement_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*==\s*([^\s;]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


@pytest.fixture
def fake_python(tmp_path):
    """A `python` first on PATH that writes its arguments, one per line, and exits 0."""
    record = tmp_path / "argv.txt"
    script = tmp_path / "bin" / "python"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {shlex.quote(str(record))}\n')
    script.chmod(0o755)
    env = {"PATH": f"{script.parent}:/usr/bin:/bin"}

    def run(argv: list[str], **extra_env: str) -> list[str]:
        record.unlink(missing_ok=True)
        done = subprocess.run(argv, env={**env, **extra_env}, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return record.read_text().splitlines()

    return run


@pytest.mark.parametrize("name", DOOR_MANIFESTS + LEGACY_MANIFESTS)
def test_manifests_parse_as_one_inferenceservice(name):
    isvc = load_manifest(name)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"


def test_dockerfile_cmd_runs_the_door_with_kserve_flags():
    door = cmd_door_flags()
    assert set(door) == {"model_name", "model_dir", "http_port", "grpc_port"}
    assert re.fullmatch(r"\$\{MODEL_NAME(:?[-?][^}]*)?\}", door["model_name"]), door["model_name"]
    assert door["model_dir"] == MODEL_DIR
    assert {int(door["http_port"]), int(door["grpc_port"])} == exposed_ports() == {8080, 8081}


def test_dockerfile_final_stage_is_non_root_in_app_with_the_handler():
    stage = final_stage()
    user = only(stage, "USER").split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), "a numeric non-root user (runAsNonRoot can check it)"
    assert only(stage, "WORKDIR") == "/app"
    copies = [rest.split() for k, rest in stage if k == "COPY" and not rest.startswith("--from")]
    assert ["handler/", "/app/handler/"] in copies
    assert json.loads(only(stage, "ENTRYPOINT")) == ["/usr/local/bin/kserve-door"]
    assert ["deploy/kserve/entrypoint.sh", "/usr/local/bin/kserve-door"] in copies


def test_dockerignore_lets_every_copied_path_through():
    ignore = (KSERVE / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore  # an allow-list: nothing else (.venv/, model_store/) goes into the context
    sources = [rest.split()[0] for k, rest in dockerfile_instructions() if k == "COPY" and not rest.startswith("--")]
    assert sources
    for source in sources:
        assert source.rstrip("/") in allowed, f"COPY {source} is left out by Dockerfile.dockerignore"
        assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"


def test_entrypoint_is_executable():
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR


def test_image_cmd_expands_model_name(fake_python):
    argv = fake_python([str(ENTRYPOINT), *cmd_argv()], MODEL_NAME="shapes")
    assert argv[:2] == ["-m", "handler.doors.kserve_door"]
    assert flags(argv[2:]) == {"model_name": "shapes", "model_dir": MODEL_DIR, "http_port": "8080",
                               "grpc_port": "8081"}


def test_image_cmd_refuses_to_start_without_a_model_name():
    done = subprocess.run([str(ENTRYPOINT), *cmd_argv()], env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "MODEL_NAME" in done.stderr


@pytest.mark.parametrize("name", DOOR_MANIFESTS)
def test_manifest_args_reach_the_door_through_the_entrypoint(name, fake_python):
    container = door_container(load_manifest(name))
    assert "command" not in container, "the image's entrypoint is what turns args into the door's command"
    argv = fake_python([str(ENTRYPOINT), *container["args"]])
    assert argv[:2] == ["-m", "handler.doors.kserve_door"] and argv[2:] == container["args"]


@pytest.mark.parametrize("name", DOOR_MANIFESTS)
def test_door_manifest_matches_the_image(name):
    isvc = load_manifest(name)
    container = door_container(isvc)
    assert container["name"] == "kserve-container"
    args = flags(container["args"])
    image = cmd_door_flags()
    assert args["model_name"] == isvc["metadata"]["name"]
    assert args["model_dir"] == MODEL_DIR
    assert args["http_port"] == image["http_port"] and args["grpc_port"] == image["grpc_port"]
    assert set(args) - {"model_name", "model_dir", "http_port", "grpc_port"} <= {"max_batch_delay_ms"}
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env.get("STORAGE_URI"), "STORAGE_URI makes the storage initializer fill /mnt/models"

    ports = container["ports"]
    assert {p["containerPort"] for p in ports} <= exposed_ports()
    by_name = {p["name"]: p["containerPort"] for p in ports}
    assert by_name.get("http1", int(args["http_port"])) == int(args["http_port"])
    assert by_name.get("h2c", int(args["grpc_port"])) == int(args["grpc_port"])
    assert len(ports) == 1, "Knative routes one port per container"

    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] in ("/v2/health/ready", f"/v2/models/{args['model_name']}/ready")
    assert probe["port"] == int(args["http_port"])

    notes = isvc["metadata"]["annotations"]
    assert notes["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert notes["prometheus.kserve.io/port"] == args["http_port"]
    assert notes["prometheus.kserve.io/path"] == "/metrics"

    limits = container["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == name.endswith("-gpu.yaml")
    if "nvidia.com/gpu" in limits:
        assert str(limits["nvidia.com/gpu"]) == "1" and container["image"].endswith(":gpu")


@pytest.mark.parametrize("name", DOOR_MANIFESTS + LEGACY_MANIFESTS)
def test_dev_shm_is_memory(name):
    predictor = load_manifest(name)["spec"]["predictor"]
    container = predictor["containers"][0] if "containers" in predictor else predictor["model"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in predictor["volumes"]}
    assert "/dev/shm" in mounts
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("package", PINNED)
def test_image_pins_match_the_repository(package):
    image = requirement_pins(KSERVE / "requirements.txt")
    repo = requirement_pins(ROOT / "requirements.txt")
    assert package in image, f"deploy/kserve/requirements.txt does not pin {package}"
    assert package in repo, f"requirements.txt does not pin {package}"
    assert image[package] == repo[package], f"{package}: image {image[package]} != repository {repo[package]}"


def test_dockerfile_installs_torch_from_the_pinned_lines():
    run = " ".join(rest for k, rest in dockerfile_instructions() if k == "RUN")
    assert "grep -E '^(torch|torchvision)==' /tmp/requirements.txt" in run
    assert "pip install -r /tmp/requirements.txt" in run
