"""run.sh: mode selection (fake docker), native runs (fake python), the venv stamp, demo, clean; and the static
shape of Dockerfile / docker-compose.yml. Fast: no network, no real venv, no Docker engine."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_SH = ROOT / "run.sh"
BASH = shutil.which("bash")


# A fake program: logs {"prog", "argv", "env"} as one JSON line to $FAKE_LOG, then behaves as $FAKE_* says.
# The fake docker keeps one image: $FAKE_IMAGE holds its source label (no file: no image); `compose build` makes it,
# and so does `compose run` when there is none, both labelled with the REAP_SOURCE_HASH they are given.
FAKE = textwrap.dedent(
    """\
    #!{python}
    import json, os, sys
    prog = os.path.basename(sys.argv[0])
    args = sys.argv[1:]
    env = {{k: v for k, v in os.environ.items() if k.startswith(("REAP_", "HF_"))}}
    with open(os.environ["FAKE_LOG"], "a") as log:
        log.write(json.dumps({{"prog": prog, "argv": args, "env": env}}) + "\\n")
    if prog == "docker":
        image = os.environ["FAKE_IMAGE"]
        if args[:1] == ["info"]:
            sys.exit(int(os.environ.get("FAKE_DOCKER_INFO_RC", "0")))
        if args[:2] == ["compose", "version"]:
            print(os.environ.get("FAKE_COMPOSE_VERSION", "2.30.3"))
            sys.exit(0)
        if args[:2] == ["image", "inspect"]:
            if not os.path.exists(image):
                sys.exit(1)
            with open(image) as label:
                print(label.read())
            sys.exit(0)
        sub = args[1:]
        while sub[:1] == ["--env-file"]:
            sub = sub[2:]
        if args[:1] == ["compose"] and (sub[:1] == ["build"] or sub[:1] == ["run"] and not os.path.exists(image)):
            with open(image, "w") as label:
                label.write(os.environ.get("REAP_SOURCE_HASH", ""))
        sys.exit(int(os.environ.get("FAKE_DOCKER_RC", "0")))
    if prog in ("python", "python3"):
        if args[:2] == ["-m", "venv"]:  # python3 -m venv DIR: make DIR/bin/python a fake too
            bindir = os.path.join(args[2], "bin")
            os.makedirs(bindir)
            with open(__file__) as me, open(os.path.join(bindir, "python"), "w") as out:
                out.write(me.read())
            os.chmod(os.path.join(bindir, "python"), 0o755)
            sys.exit(0)
        if args[:1] == ["-c"]:  # version checks
            sys.exit(int(os.environ.get("FAKE_PY_TOO_OLD", "0")))
        if args[:1] == ["--version"]:
            print("Python 3.11.7")
            sys.exit(0)
        if args[:3] == ["-m", "pip", "install"]:  # pip's chatter, which run.sh keeps in a log
            print("Collecting torch==2.11.0\\n  Downloading torch-2.11.0.whl (800 MB)\\nERROR: pip said no"
                  if args[0] == os.environ.get("FAKE_PY_FAIL_ON") else "Collecting torch==2.11.0\\n  Downloading")
        if args[:1] and args[0] == os.environ.get("FAKE_PY_FAIL_ON"):
            sys.exit(3)
    sys.exit(0)
    """
).format(python=sys.executable)


class Sandbox:
    """A copy of run.sh (plus stub scripts) in a temporary folder, with fake programs on PATH."""

    def __init__(self, tmp_path: Path):
        self.root = tmp_path / "repo"
        self.root.mkdir()
        shutil.copy2(RUN_SH, self.root / "run.sh")
        shutil.copy2(ROOT / ".dockerignore", self.root / ".dockerignore")
        for name in ("reap.py", "prune_model.py", "test_pruned_model.py"):
            (self.root / name).write_text("# stub\n")
        (self.root / "requirements.txt").write_text("torch==2.11.0\n")
        (self.root / "requirements-dev.txt").write_text("-r requirements.txt\npytest>=8\n")
        (self.root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
        self.fakebin = tmp_path / "fakebin"
        self.fakebin.mkdir()
        self.log = tmp_path / "calls.jsonl"
        self.image = tmp_path / "image-label"
        self.fake_python = self.add_fake("python")
        # Only the basic tools from the system, so that no real docker / nvidia-smi / python3 is found.
        self.sysbin = tmp_path / "sysbin"
        self.sysbin.mkdir()
        for tool in ("bash", "env", "cat", "cut", "sort", "mkdir", "rm", "find", "id", "timeout", "sha256sum",
                     "dirname", "tr", "grep", "printf"):
            found = shutil.which(tool)
            if found:
                (self.sysbin / tool).symlink_to(found)

    def add_fake(self, name: str) -> Path:
        path = self.fakebin / name
        path.write_text(FAKE)
        path.chmod(0o755)
        return path

    def remove_fake(self, name: str) -> None:
        (self.fakebin / name).unlink()

    def run(self, *args: str, engine: bool | None = True, native_python: bool = True, **env: str):
        """engine: True (docker info ok), False (docker info fails), None (no docker at all)."""
        if engine is None:
            if (self.fakebin / "docker").exists():
                self.remove_fake("docker")
        elif not (self.fakebin / "docker").exists():
            self.add_fake("docker")
        base = {
            "PATH": f"{self.fakebin}:{self.sysbin}",
            "HOME": str(self.root),
            "FAKE_LOG": str(self.log),
            "FAKE_IMAGE": str(self.image),
            "FAKE_DOCKER_INFO_RC": "0" if engine else "1",
            "LC_ALL": "C",
        }
        if native_python:
            base["REAP_PYTHON"] = str(self.fake_python)
        base.update(env)
        if self.log.exists():
            self.log.unlink()
        return subprocess.run([BASH, str(self.root / "run.sh"), *args], cwd=self.root, env=base,
                              capture_output=True, text=True, timeout=60)

    def calls(self, prog: str | None = None) -> list[dict]:
        if not self.log.exists():
            return []
        rows = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [r for r in rows if prog is None or r["prog"] == prog]

    def compose_calls(self) -> list[list[str]]:
        return [c["argv"] for c in self.calls("docker") if c["argv"][:1] == ["compose"]
                and c["argv"][1:2] != ["version"]]

    def compose_env(self, subcommand: str = "run") -> dict:
        """The REAP_*/HF_* environment of the only `docker compose [--env-file F] SUBCOMMAND` call."""
        (env,) = [c["env"] for c in self.calls("docker")
                  if c["argv"][:1] == ["compose"] and subcommand in c["argv"][1:4]]
        return env


@pytest.fixture
def box(tmp_path) -> Sandbox:
    sandbox = Sandbox(tmp_path)
    sandbox.add_fake("nvidia-smi")  # a GPU host unless a test removes it
    return sandbox


# ------------------------------------------------------------------------------------------------ mode selection


def test_engine_up_runs_in_container(box):
    result = box.run("reap", "--foo", "bar")
    assert result.returncode == 0, result.stderr
    assert box.compose_calls() == [["compose", "run", "--rm", "reap", "python", "reap.py", "--foo", "bar"]]
    assert box.calls("python") == []


@pytest.mark.parametrize(("command", "script"), [("prune", "prune_model.py"), ("test", "test_pruned_model.py")])
def test_engine_up_other_scripts(box, command, script):
    result = box.run(command, "--model", "a b")
    assert result.returncode == 0, result.stderr
    assert box.compose_calls() == [["compose", "run", "--rm", "reap", "python", script, "--model", "a b"]]


def test_container_exit_code_propagates(box):
    result = box.run("reap", FAKE_DOCKER_RC="7")
    assert result.returncode == 7


def test_container_gets_reap_variables_but_not_launcher_ones(box):
    result = box.run("reap", REAP_PRUNE_RATIO="0.3", HF_TOKEN="t", REAP_DATA_DIR="data", REAP_UID="1234",
                     OTHER="x")
    assert result.returncode == 0, result.stderr
    (call,) = box.compose_calls()
    assert call[:3] == ["compose", "run", "--rm"]
    assert call[call.index("reap"):] == ["reap", "python", "reap.py"]
    forwarded = [call[i + 1] for i, arg in enumerate(call) if arg == "-e"]
    assert forwarded == ["HF_TOKEN", "REAP_PRUNE_RATIO"]
    (docker_env,) = [c["env"] for c in box.calls("docker") if c["argv"][:2] == ["compose", "run"]]
    assert docker_env["REAP_UID"] == "1234" and docker_env["REAP_GID"] == str(os.getgid())
    assert (box.root / "output").is_dir() and (box.root / "data").is_dir()


@pytest.mark.parametrize("engine", [False, None], ids=["docker-info-fails", "no-docker"])
def test_no_engine_runs_natively(box, engine):
    result = box.run("reap", "--foo", "bar", engine=engine)
    assert result.returncode == 0, result.stderr
    assert [c["argv"] for c in box.calls("python")] == [["reap.py", "--foo", "bar"]]
    assert box.compose_calls() == []


def test_native_exit_code_propagates(box):
    result = box.run("prune", engine=False, FAKE_PY_FAIL_ON="prune_model.py")
    assert result.returncode == 3


def test_runtime_native_overrides_engine(box):
    result = box.run("reap", "-x", REAP_RUNTIME="native")
    assert result.returncode == 0, result.stderr
    assert [c["argv"] for c in box.calls("python")] == [["reap.py", "-x"]]
    assert box.calls("docker") == []


@pytest.mark.parametrize("line", ["REAP_RUNTIME='native'", "export REAP_RUNTIME=native  # no container"])
def test_runtime_native_from_dotenv(box, line):
    (box.root / ".env").write_text(f"# comment\nREAP_RUNTIME=docker\n{line}\nREAP_MODEL_PATH=a path with spaces\n")
    result = box.run("reap")
    assert result.returncode == 0, result.stderr
    assert box.calls("docker") == [] and len(box.calls("python")) == 1
    assert box.run("reap", REAP_RUNTIME="auto").returncode == 0  # the environment beats .env
    assert len(box.compose_calls()) == 1


def test_runtime_docker_without_engine_fails(box):
    result = box.run("reap", engine=False, REAP_RUNTIME="docker")
    assert result.returncode == 1
    assert "Docker engine" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert box.calls("python") == []


def test_invalid_runtime(box):
    result = box.run("reap", REAP_RUNTIME="podman")
    assert result.returncode == 1 and "REAP_RUNTIME=podman" in result.stderr


@pytest.mark.parametrize("command", ["build", "shell"])
def test_container_only_commands_need_engine(box, command):
    result = box.run(command, engine=False)
    assert result.returncode == 1
    assert "needs a Docker engine" in result.stderr


def test_container_commands(box):
    assert box.run("build", "--no-cache").returncode == 0
    assert box.compose_calls() == [["compose", "build", "--no-cache"]]
    assert box.run("shell").returncode == 0
    assert box.compose_calls() == [["compose", "run", "--rm", "reap", "bash"]]
    assert box.run("selftest", "-k", "x").returncode == 0
    assert box.compose_calls() == [["compose", "run", "--rm", "reap", "python", "-m", "pytest", "-q", "-p",
                                    "no:cacheprovider", "-k", "x"]]
    assert box.run("gpu").returncode == 0
    assert box.compose_calls() == [["compose", "run", "--rm", "reap", "nvidia-smi"]]


def test_host_without_gpu_uses_cpu_service(box):
    box.remove_fake("nvidia-smi")
    result = box.run("reap")
    assert result.returncode == 0, result.stderr
    assert box.compose_calls() == [["compose", "run", "--rm", "reap-cpu", "python", "reap.py"]]
    assert "reap-cpu" in result.stderr
    box.add_fake("nvidia-smi")
    assert box.run("reap", REAP_GPU_COUNT="0").returncode == 0
    assert box.compose_calls() == [["compose", "run", "--rm", "reap-cpu", "python", "reap.py"]]


def test_missing_or_old_compose_plugin(box):
    result = box.run("reap", FAKE_COMPOSE_VERSION="2.20.2")
    assert result.returncode == 1 and "2.24" in result.stderr
    assert box.compose_calls() == []
    assert box.run("reap", FAKE_COMPOSE_VERSION="v2.24.0").returncode == 0


def test_gpu_natively(box):
    assert box.run("gpu", "-L", engine=False).returncode == 0
    assert [c["argv"] for c in box.calls("nvidia-smi")] == [["-L"]]
    box.remove_fake("nvidia-smi")
    result = box.run("gpu", engine=False)
    assert result.returncode == 1 and "nvidia-smi" in result.stderr


def test_selftest_natively(box):
    result = box.run("selftest", "-x", engine=False)
    assert result.returncode == 0, result.stderr
    assert [c["argv"] for c in box.calls("python")] == [["-m", "pytest", "-q", "-x"]]
    assert box.run("selftest", engine=False, FAKE_PY_FAIL_ON="-m").returncode == 3


def test_missing_env_file(box):
    result = box.run("reap", engine=False, REAP_ENV_FILE="nope.env")
    assert result.returncode == 1 and "nope.env" in result.stderr


# ------------------------------------------------------------------------------------------------ Compose's settings


def test_compose_settings_come_from_reap_env_file(box, tmp_path):
    """docker-compose.yml's ${REAP_DATA_DIR} / ${REAP_GPU_COUNT} follow REAP_ENV_FILE as run.sh does, not ./.env."""
    mounted = tmp_path / "mnt" / "m"
    (box.root / ".env").write_text("REAP_DATA_DIR=from-dotenv\nREAP_GPU_COUNT=0\nREAP_BASE_IMAGE=dotenv-base\n")
    (box.root / "prod.env").write_text(f"REAP_DATA_DIR={mounted}\nREAP_GPU_COUNT=2\nREAP_MODEL_PATH=data/m\n")
    result = box.run("reap", REAP_ENV_FILE="prod.env")
    assert result.returncode == 0, result.stderr
    # --env-file: Compose reads prod.env, not ./.env, for whatever the environment leaves unset (REAP_BASE_IMAGE
    # here: its default, as for run.sh); its env_file (${REAP_ENV_FILE:-.env}) gives the container prod.env.
    assert box.compose_calls() == [["compose", "--env-file", "prod.env", "run", "--rm", "reap", "python", "reap.py"]]
    env = box.compose_env()
    assert env["REAP_DATA_DIR"] == str(mounted) and env["REAP_GPU_COUNT"] == "2"
    assert env["REAP_ENV_FILE"] == "prod.env" and "REAP_BASE_IMAGE" not in env
    assert mounted.is_dir() and not (box.root / "from-dotenv").exists()


def test_compose_settings_unset_in_reap_env_file_take_the_default(box):
    (box.root / ".env").write_text("REAP_DATA_DIR=from-dotenv\n")
    (box.root / "prod.env").write_text("REAP_MODEL_PATH=data/m\n")
    result = box.run("reap", REAP_ENV_FILE="prod.env")
    assert result.returncode == 0, result.stderr
    (call,) = box.compose_calls()
    assert call[:3] == ["compose", "--env-file", "prod.env"]
    assert "REAP_DATA_DIR" not in box.compose_env()
    assert (box.root / "data").is_dir() and not (box.root / "from-dotenv").exists()


@pytest.mark.parametrize(("line", "folder"), [
    ("REAP_DATA_DIR='my data'  # quoted", "my data"),
    ('REAP_DATA_DIR="${HOME}/my data"', "my data"),  # HOME is the sandbox
    ("REAP_DATA_DIR=${NOT_SET:-fallback}/d # comment", "fallback/d"),
    ("REAP_DATA_DIR='${HOME}'", "${HOME}"),  # single quotes: literal, as for Compose and python-dotenv
])
def test_compose_settings_from_dotenv_and_environment(box, line, folder):
    """run.sh reads .env as Compose would, and hands Compose what it read: the folder it makes is the one mounted."""
    (box.root / ".env").write_text(f"{line}\nREAP_GPU_COUNT=1 # one\n")
    result = box.run("reap", REAP_GPU_COUNT="3")
    assert result.returncode == 0, result.stderr
    assert box.compose_calls() == [["compose", "run", "--rm", "reap", "python", "reap.py"]]  # Compose reads .env
    env = box.compose_env()
    assert env["REAP_GPU_COUNT"] == "3"  # the environment beats .env
    made = box.root / folder
    assert made.is_dir() and Path(box.root, env["REAP_DATA_DIR"]) == made


def test_build_args_from_reap_env_file(box):
    (box.root / "prod.env").write_text("REAP_BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04\nREAP_INSTALL_VLLM=1\n")
    result = box.run("build", "--pull", REAP_ENV_FILE="prod.env")
    assert result.returncode == 0, result.stderr
    assert box.compose_calls() == [["compose", "--env-file", "prod.env", "build", "--pull"]]
    env = box.compose_env("build")
    assert env["REAP_BASE_IMAGE"] == "nvidia/cuda:12.8.1-base-ubuntu24.04" and env["REAP_INSTALL_VLLM"] == "1"
    assert re.fullmatch(r"[0-9a-f]{64}", env["REAP_SOURCE_HASH"])


def test_build_failure_propagates(box):
    assert box.run("build", FAKE_DOCKER_RC="5").returncode == 5


def test_demo_in_container_keeps_the_launcher_settings(box):
    """The demo swaps REAP_ENV_FILE for demo/demo.env; Compose still mounts and counts what run.sh used."""
    (box.root / ".env").write_text("REAP_GPU_COUNT=0\nREAP_DATA_DIR=models-here\n")
    result = box.run("demo")
    assert result.returncode == 0, result.stderr
    calls = box.compose_calls()
    assert all(c[:4] == ["compose", "--env-file", "demo/demo.env", "run"] and "reap-cpu" in c for c in calls)
    run_env = [c["env"] for c in box.calls("docker") if c["argv"][:1] == ["compose"] and "run" in c["argv"]]
    assert run_env and all(e["REAP_GPU_COUNT"] == "0" and e["REAP_DATA_DIR"] == "models-here" for e in run_env)


# ------------------------------------------------------------------------------------------------ image staleness


def _warnings(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "warning" in line]


def test_image_built_by_run_sh_is_current(box):
    assert box.run("build").returncode == 0
    label = box.image.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", label)
    result = box.run("reap")
    assert result.returncode == 0, result.stderr
    assert _warnings(result) == []
    assert box.compose_env()["REAP_SOURCE_HASH"] == label
    assert ["image", "inspect"] == [c["argv"][:2] for c in box.calls("docker") if c["argv"][0] == "image"][0]


@pytest.mark.parametrize("change", ["reap.py", "reap_vlm/new_module.py", "requirements.txt", ".env.example"])
def test_stale_image_warns(box, change):
    assert box.run("build").returncode == 0
    (box.root / change).parent.mkdir(parents=True, exist_ok=True)
    with open(box.root / change, "a") as f:
        f.write("# a git pull\n")
    result = box.run("reap")
    assert result.returncode == 0, result.stderr
    (warning,) = _warnings(result)
    assert "./run.sh build" in warning and "reap-vlm" in warning
    assert len(box.compose_calls()) == 1  # it still runs
    # Rebuilt: quiet again.
    assert box.run("build").returncode == 0
    assert _warnings(box.run("reap")) == []


def test_stale_image_warns_for_every_container_command_but_gpu(box):
    assert box.run("build").returncode == 0
    (box.root / "reap.py").write_text("# changed\n")
    for command in ("prune", "test", "shell", "selftest"):
        assert len(_warnings(box.run(command))) == 1, command
    result = box.run("full")
    assert len(_warnings(result)) == 1 and len(box.compose_calls()) == 3  # once, not per stage
    assert _warnings(box.run("gpu")) == []


def test_files_outside_the_image_do_not_make_it_stale(box):
    """What .dockerignore leaves out of the image (data, outputs, .env, caches, ...) is not part of its hash."""
    assert box.run("build").returncode == 0
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith(("#", "!")):
            continue
        target = box.root / pattern.replace("**/", "sub/").replace("*", "x")  # data, .env.x, sub/x.pyc, ...
        if not target.suffix and target.name not in (".env", ".gitignore"):
            target = target / "file"  # a folder: something inside it
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("changed\n")
    result = box.run("reap")
    assert result.returncode == 0, result.stderr
    assert _warnings(result) == []


def test_no_image_yet_compose_builds_it_labelled(box):
    result = box.run("reap")
    assert result.returncode == 0, result.stderr
    assert _warnings(result) == []
    assert box.image.read_text() == box.compose_env()["REAP_SOURCE_HASH"]  # `compose run` built it
    assert _warnings(box.run("reap")) == []


def test_image_without_label_warns(box):
    box.image.write_text("")  # built by `docker compose build` without run.sh
    result = box.run("reap")
    assert result.returncode == 0, result.stderr
    (warning,) = _warnings(result)
    assert "./run.sh build" in warning


# ------------------------------------------------------------------------------------------------ help, usage


def test_help(box):
    result = box.run("help")
    assert result.returncode == 0
    for word in ("reap", "prune", "test", "full", "demo", "selftest", "shell", "build", "gpu", "clean",
                 "REAP_RUNTIME", "REAP_PYTHON", "REAP_MODEL_PATH"):
        assert word in result.stdout
    assert box.calls() == []  # help asks nothing of Docker


@pytest.mark.parametrize("args", [["frobnicate"], []], ids=["unknown", "none"])
def test_unknown_command(box, args):
    result = box.run(*args)
    assert result.returncode == 2
    assert "usage: ./run.sh" in result.stderr
    assert box.calls() == []


# ------------------------------------------------------------------------------------------------ full, demo


def test_full_runs_three_stages_and_stops_at_first_failure(box):
    result = box.run("full", engine=False)
    assert result.returncode == 0, result.stderr
    assert [c["argv"] for c in box.calls("python")] == [["reap.py"], ["prune_model.py"], ["test_pruned_model.py"]]
    result = box.run("full", engine=False, FAKE_PY_FAIL_ON="prune_model.py")
    assert result.returncode == 3
    assert [c["argv"] for c in box.calls("python")] == [["reap.py"], ["prune_model.py"]]
    assert box.run("full", "--x", engine=False).returncode == 2


def test_full_in_container(box):
    assert box.run("full").returncode == 0
    assert [call[4:] for call in box.compose_calls()] == [["python", "reap.py"], ["python", "prune_model.py"],
                                                          ["python", "test_pruned_model.py"]]


HELDOUT = ["--calibration", "reference/calibration/heldout.json"]
DEMO_CALLS = [["reap.py"], ["prune_model.py", "--force", "--verify"], ["test_pruned_model.py", *HELDOUT],
              ["prune_model.py", "--force", "--criterion", "frequency", "--output", "demo/output/pruned-frequency"],
              ["test_pruned_model.py", *HELDOUT, "--model", "demo/output/pruned-frequency", "--output",
               "demo/output/test-report-frequency"]]


def test_demo_runs_every_stage_that_exists(box):
    (box.root / ".env").write_text("REAP_METADATA_PATH=/elsewhere/reap_metadata.json\n")
    result = box.run("demo", engine=False, REAP_KEEP_MULTIPLE="8")
    assert result.returncode == 0, result.stderr
    calls = box.calls("python")
    assert [c["argv"] for c in calls] == DEMO_CALLS
    env = calls[0]["env"]
    assert env["REAP_ENV_FILE"] == "demo/demo.env" and env["HF_HUB_OFFLINE"] == "1"
    assert "REAP_KEEP_MULTIPLE" not in env  # the shell's settings do not leak into the demo
    settings = dict(line.split("=", 1) for line in (box.root / "demo/demo.env").read_text().splitlines()
                    if line and not line.startswith("#"))
    assert settings["REAP_MODEL_PATH"] == settings["REAP_REFERENCE_PATH"] == "reference/model"
    assert settings["REAP_CALIBRATION_PATH"] == "reference/calibration/mixed.json"
    assert settings["REAP_EVAL_PATH"] == "reference/eval_small.jsonl"
    assert settings["REAP_OUTPUT_PATH"] == "demo/output/reap"
    assert settings["REAP_PRUNED_OUTPUT_PATH"] == "demo/output/pruned-model"
    assert settings["REAP_TEST_OUTPUT_PATH"] == "demo/output/test-report"
    assert settings["REAP_DEVICE"] == "cpu"
    assert 32 - int(32 * float(settings["REAP_PRUNE_RATIO"])) >= 4  # the reference model: 32 experts, top-4
    assert "REAP_METADATA_PATH" not in settings
    assert "demo/output/pruned-model" in result.stdout and "skipped" not in result.stdout
    # A rerun runs the same stages.
    assert box.run("demo", engine=False).returncode == 0
    assert [c["argv"] for c in box.calls("python")] == DEMO_CALLS


def test_demo_skips_missing_stages(box):
    (box.root / "test_pruned_model.py").unlink()
    result = box.run("demo", engine=False)
    assert result.returncode == 0, result.stderr
    assert [c["argv"][0] for c in box.calls("python")] == ["reap.py", "prune_model.py"]
    assert "test (test_pruned_model.py not found)" in result.stdout
    (box.root / "prune_model.py").unlink()
    result = box.run("demo", engine=False)
    assert result.returncode == 0, result.stderr
    assert [c["argv"][0] for c in box.calls("python")] == ["reap.py"]
    assert "prune (prune_model.py not found)" in result.stdout


def test_demo_in_container(box):
    result = box.run("demo", REAP_BATCH_SIZE="4")
    assert result.returncode == 0, result.stderr
    calls = box.compose_calls()
    assert [c[c.index("reap") + 1:] for c in calls] == [["python", *argv] for argv in DEMO_CALLS]
    assert all("REAP_BATCH_SIZE" not in c and "HF_HUB_OFFLINE" in c for c in calls)
    run_env = [c["env"] for c in box.calls("docker") if c["argv"][:2] == ["compose", "run"]]
    assert all(env["REAP_ENV_FILE"] == "demo/demo.env" for env in run_env)  # compose's env_file


def test_demo_stage_failure_stops(box):
    result = box.run("demo", engine=False, FAKE_PY_FAIL_ON="reap.py")
    assert result.returncode == 3
    assert [c["argv"][0] for c in box.calls("python")] == ["reap.py"]


# ------------------------------------------------------------------------------------------------ native .venv


def test_venv_created_once_and_reinstalled_when_requirements_change(box):
    box.add_fake("python3")
    first = box.run("reap", engine=False, native_python=False)
    assert first.returncode == 0, first.stderr
    assert [c["argv"][:2] for c in box.calls("python3")][-1] == ["-m", "venv"]
    venv_calls = [c["argv"] for c in box.calls("python")]
    assert venv_calls == [["-m", "pip", "install", "--disable-pip-version-check", "-r", "requirements-dev.txt",
                           "-e", "."], ["reap.py"]]
    assert (box.root / ".venv/.reap-requirements.sha256").is_file()

    second = box.run("reap", engine=False, native_python=False)
    assert second.returncode == 0, second.stderr
    assert box.calls("python3") == []
    assert [c["argv"] for c in box.calls("python")] == [["reap.py"]]

    (box.root / "requirements.txt").write_text("torch==2.11.0\nnumpy\n")
    third = box.run("reap", engine=False, native_python=False)
    assert [c["argv"][:3] for c in box.calls("python")] == [["-m", "pip", "install"], ["reap.py"]]
    assert third.returncode == 0


def test_first_run_prints_one_line_per_step_and_keeps_pip_log(box):
    box.add_fake("python3")
    result = box.run("reap", engine=False, native_python=False)
    assert result.returncode == 0, result.stderr
    steps = [line for line in result.stderr.splitlines() if line.startswith("run.sh: [")]
    assert [line.split("]")[0] for line in steps] == ["run.sh: [1/2", "run.sh: [2/2"]
    assert all(line.endswith(" done") for line in steps), steps
    assert "Collecting" not in result.stderr and "Downloading" not in result.stderr
    assert "Collecting torch" in (box.root / ".venv/setup.log").read_text()
    assert not (box.root / ".reap-setup.log").exists()


def test_existing_venv_without_stamp_gets_installed(box):
    bindir = box.root / ".venv/bin"
    bindir.mkdir(parents=True)
    shutil.copy2(box.fake_python, bindir / "python")
    result = box.run("reap", engine=False, native_python=False)
    assert result.returncode == 0, result.stderr
    assert [c["argv"][:3] for c in box.calls("python")] == [["-m", "pip", "install"], ["reap.py"]]


def test_failed_install_leaves_no_stamp(box):
    bindir = box.root / ".venv/bin"
    bindir.mkdir(parents=True)
    shutil.copy2(box.fake_python, bindir / "python")
    result = box.run("reap", engine=False, native_python=False, FAKE_PY_FAIL_ON="-m")
    assert result.returncode == 1 and "rerun" in result.stderr
    assert "... failed" in result.stderr and "    ERROR: pip said no" in result.stderr  # the log's last lines
    assert "the full log: .venv/setup.log" in result.stderr
    assert not (box.root / ".venv/.reap-requirements.sha256").exists()
    assert [c["argv"][0] for c in box.calls("python")] == ["-m"]  # reap.py never ran


def test_old_python_refused(box):
    box.add_fake("python3")
    result = box.run("reap", engine=False, native_python=False, FAKE_PY_TOO_OLD="1")
    assert result.returncode == 1 and "3.10" in result.stderr
    assert not (box.root / ".venv").exists()


def test_reap_python_must_exist(box):
    result = box.run("reap", engine=False, REAP_PYTHON="/nonexistent/python")
    assert result.returncode == 1 and "REAP_PYTHON" in result.stderr


# ------------------------------------------------------------------------------------------------ clean


def test_clean(box):
    for folder in ("output/reap", "demo/output/reap", "demo/model", ".pytest_cache", "reap_vlm/__pycache__",
                   ".venv/bin", "data/models", ".venv/lib/__pycache__"):
        (box.root / folder).mkdir(parents=True)
    result = box.run("clean")
    assert result.returncode == 0, result.stderr
    gone = ("output", "demo/output", ".pytest_cache", "reap_vlm/__pycache__")
    assert not any((box.root / g).exists() for g in gone)
    assert all((box.root / k).exists() for k in ("demo/model", ".venv/bin", "data/models", ".venv/lib/__pycache__"))
    assert box.calls() == []
    assert box.run("clean", "--all").returncode == 0
    assert not (box.root / ".venv").exists() and not (box.root / "demo").exists()
    assert (box.root / "data/models").is_dir()
    assert box.run("clean", "--everything").returncode == 2


# ------------------------------------------------------------------------------------------------ static config


def _compose() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_service():
    compose = _compose()
    service = compose["services"]["reap"]
    assert service["image"] == "reap-vlm" and service["working_dir"] == "/app"
    assert service["build"]["dockerfile"] == "Dockerfile"
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == "${REAP_GPU_COUNT:-all}"
    assert service["env_file"] == [{"path": "${REAP_ENV_FILE:-.env}", "required": False}]
    assert "${REAP_DATA_DIR:-./data}:/app/data" in service["volumes"]
    assert "./output:/app/output" in service["volumes"]
    assert any(v.startswith("hf-cache:") for v in service["volumes"]) and "hf-cache" in compose["volumes"]
    assert service["ulimits"]["memlock"] == -1 and service["shm_size"]
    assert "network_mode" not in service
    cpu = compose["services"]["reap-cpu"]
    assert "deploy" not in cpu and cpu["volumes"] == service["volumes"] and cpu["profiles"] == ["cpu"]


def test_dockerfile_and_compose_agree():
    dockerfile = (ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(.*)$", dockerfile, flags=re.M))
    build_args = _compose()["services"]["reap"]["build"]["args"]
    for name, value in build_args.items():
        default = re.fullmatch(r"\$\{REAP_\w+:-(.*)\}", value).group(1)
        assert args[name].strip('"') == default, name
    assert args["INSTALL_FLASH_ATTN"] == "0" and args["INSTALL_VLLM"] == "0"
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in dockerfile
    assert "HEALTHCHECK" not in dockerfile and "HF_HUB_OFFLINE=" not in dockerfile
    users = re.findall(r"^USER (\S+)", dockerfile, flags=re.M)
    assert users and users[-1] not in ("root", "0", "0:0")
    # Requirements are installed before the code is copied (layer caching).
    assert dockerfile.index("COPY requirements.txt requirements-dev.txt") < dockerfile.index("COPY . /app")


def test_source_label_shared_by_dockerfile_compose_and_run_sh():
    dockerfile = (ROOT / "Dockerfile").read_text()
    run_sh = RUN_SH.read_text()
    label = re.search(r"^SOURCE_LABEL=(\S+)", run_sh, flags=re.M).group(1)
    assert f'{label}="${{SOURCE_HASH}}"' in dockerfile
    assert re.search(r"^IMAGE=(\S+)", run_sh, flags=re.M).group(1) == _compose()["services"]["reap"]["image"]
    assert _compose()["services"]["reap"]["build"]["args"]["SOURCE_HASH"] == "${REAP_SOURCE_HASH:-}"
    # Declared after the last RUN: a new hash never invalidates a cached layer.
    assert dockerfile.rindex("\nRUN ") < dockerfile.index("ARG SOURCE_HASH")


def test_dockerignore_keeps_data_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", ".env", "data", "output", "demo", "cache", "**/__pycache__"):
        assert entry in ignored
