"""The container image and prefect.yaml, checked without a Docker daemon (none runs on CI machines).

What a build would catch and these do not: whether the base image and the wheels can be fetched,
and whether tensorflow-tpu of the pinned version exists (deployments/README.md).
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from tests.conftest import REPO

BUILD_STEP = "prefect_docker.deployments.steps.build_docker_image"
PUSH_STEP = "prefect_docker.deployments.steps.push_docker_image"


def _logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined and comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        if not cur and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    return [ln.strip() for ln in out if ln.strip()]


def _pip_installs(commands: list[str]) -> list[list[str]]:
    """The arguments of each ``<python> -m pip install ...`` in shell commands, in order."""
    found = []
    for command in commands:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)  # quotes kept whole, `&&`/`;` split
        lexer.whitespace_split = True
        simple: list[list[str]] = [[]]
        for word in lexer:
            if word in {"&&", "||", ";", ";;", "|", ")", "("}:
                simple.append([])
            else:
                simple[-1].append(word)
        for words in simple:
            for i in range(len(words) - 2):
                if words[i : i + 3] == ["-m", "pip", "install"]:
                    found.append(words[i + 3 :])
    return found


def makefile_installs() -> list[list[str]]:
    """The pip installs of the Makefile's install recipe (the ``$(STAMP)`` target)."""
    recipe, inside = [], False
    for line in (REPO / "Makefile").read_text().splitlines():
        if line.startswith("$(STAMP):"):
            inside = True
            continue
        if inside:
            if not line.startswith("\t"):
                break
            recipe.append(line.strip())
    return _pip_installs(recipe)


def dockerfile() -> list[str]:
    return _logical_lines((REPO / "Dockerfile").read_text())


def dockerfile_installs() -> list[list[str]]:
    return _pip_installs([ln[len("RUN ") :] for ln in dockerfile() if ln.startswith("RUN ")])


def prefect_yaml() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def deploy_configs() -> tuple[list[dict], dict]:
    """prefect.yaml as `prefect deploy` reads it (validated by Prefect's own model, which skips
    the whole file, with only a yellow warning, when it does not validate)."""
    import io

    from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    from rich.console import Console

    out = io.StringIO()
    configs, actions = _load_deploy_configs_and_actions(REPO / "prefect.yaml", console=Console(file=out))
    assert not out.getvalue(), out.getvalue()
    return configs, actions


def deployment(name: str, flow_file: str) -> dict:
    configs, _ = deploy_configs()
    (dep,) = [d for d in configs if d["name"] == name and d["entrypoint"].startswith(flow_file)]
    return dep


def test_the_image_installs_the_project_as_make_install_does():
    make = makefile_installs()
    assert make and any(".[test]" in args for args in make), make  # the parser found the real recipe
    docker = dockerfile_installs()
    # The image runs the Makefile's installs first, argument for argument; what follows only adds
    # the accelerator's TensorFlow build, never the project again.
    assert docker[: len(make)] == make, (docker, make)
    assert not any(a.startswith(".") for args in docker[len(make) :] for a in args), docker


def test_the_base_image_has_the_python_pyproject_requires():
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    lines = dockerfile()
    args = dict(re.match(r"ARG (\w+)=(\S+)", ln).groups() for ln in lines if re.match(r"ARG \w+=", ln))
    (base,) = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    name, tag = image.split(":")
    assert name == "python", image  # tensorflow comes from pyproject's pin, not from the base image
    version = re.match(r"(\d+\.\d+)", tag).group(1)
    assert version + ".0" in SpecifierSet(requires) and version + ".99" in SpecifierSet(requires), (tag, requires)


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".store"} <= ignored


def test_every_deployment_entrypoint_is_a_flow():
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    deployments = prefect_yaml()["deployments"]
    assert {d["name"] for d in deployments} >= {"weekly", "adhoc", "local", "vertex-tpu"}
    for dep in deployments:
        path, _, func = dep["entrypoint"].partition(":")
        assert (REPO / path).is_file() and func, dep["entrypoint"]
        flow = load_flow_from_entrypoint(str(REPO / dep["entrypoint"]))
        assert isinstance(flow, Flow), dep["entrypoint"]
    names = [(load_flow_from_entrypoint(str(REPO / d["entrypoint"])).name, d["name"]) for d in deployments]
    assert len(set(names)) == len(names), names  # `prefect deploy --name flow/deployment` is unambiguous
    assert deployment("weekly", "flows/retrain.py")["concurrency_limit"] == 1


def test_only_the_vertex_deployment_builds_an_image_and_runs_that_image():
    from prefect.utilities.templating import apply_values

    configs, actions = deploy_configs()
    assert actions["build"] == [] and actions["push"] == []  # process deployments build nothing
    for dep in configs:
        if dep["name"] != "vertex-tpu":
            assert "build" not in dep and "push" not in dep, dep["name"]

    vertex = deployment("vertex-tpu", "flows/train_model.py")
    (build,) = vertex["build"]
    step = build[BUILD_STEP]
    assert (REPO / step["dockerfile"]).is_file() and step["requires"].startswith("prefect-docker")
    accelerator = step["buildargs"]["ACCELERATOR"]
    assert re.search(rf"^\s*{accelerator}\)", (REPO / "Dockerfile").read_text(), re.M), accelerator

    # What `prefect deploy` does after the build step: template the push step and the deployment
    # with the step's outputs (keyed by its id). The job must run exactly the pushed image.
    built = {"image_name": "registry.example/covid-xray", "tag": "2026-12-01t03", "image_id": "sha256:0"}
    built["image"] = f"{built['image_name']}:{built['tag']}"
    resolved = apply_values(vertex, {step["id"]: built})
    (push,) = resolved["push"]
    assert (push[PUSH_STEP]["image_name"], push[PUSH_STEP]["tag"]) == (built["image_name"], built["tag"])
    assert resolved["work_pool"]["name"] == "vertex-tpu"
    assert resolved["work_pool"]["job_variables"]["image"] == built["image"]

    # The pool's template hands that variable to the Vertex AI job's container.
    template = json.loads((REPO / "deployments" / "vertex-tpu-pool.json").read_text())
    (pool_spec,) = template["job_configuration"]["job_spec"]["worker_pool_specs"]
    assert pool_spec["container_spec"]["image_uri"] == "{{ image }}"
    assert "image" in template["variables"]["properties"]

    # The image's flow code is where the deployment's pull step looks for it.
    (pull,) = vertex["pull"]
    workdir = [ln.split()[1] for ln in dockerfile() if ln.startswith("WORKDIR ")][-1]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == workdir


@pytest.mark.parametrize("pool", ["local-process-pool.json", "vertex-tpu-pool.json"])
def test_pool_templates_are_json(pool: str):
    template = json.loads((REPO / "deployments" / pool).read_text())
    assert {"job_configuration", "variables"} <= set(template)


def test_the_dockerfile_shell_steps_parse_and_the_accelerator_step_runs_here(tmp_path):
    """Every RUN is valid /bin/sh; the accelerator step, run here with this venv's python, accepts
    `cpu` (and finds TensorFlow and the flows) and refuses an unknown accelerator."""
    import os
    import subprocess
    import sys

    runs = [ln[len("RUN ") :] for ln in dockerfile() if ln.startswith("RUN ")]
    for cmd in runs:
        res = subprocess.run(["sh", "-n", "-c", cmd], capture_output=True, text=True)
        assert res.returncode == 0, (cmd, res.stderr)
    (accelerator_step,) = [cmd for cmd in runs if "ACCELERATOR" in cmd]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "python"  # `python` in the step is this venv's (a symlink would lose the venv)
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TF_CPP_MIN_LOG_LEVEL": "3"}
    bad = subprocess.run(
        ["sh", "-c", accelerator_step], env={**env, "ACCELERATOR": "quantum"}, capture_output=True, text=True
    )
    assert bad.returncode == 1 and "ACCELERATOR must be tpu, gpu or cpu" in bad.stderr, bad.stderr
    ok = subprocess.run(
        ["sh", "-c", accelerator_step], env={**env, "ACCELERATOR": "cpu"}, cwd=REPO, capture_output=True, text=True
    )
    assert ok.returncode == 0 and "(cpu)" in ok.stdout, ok.stdout + ok.stderr[-2000:]


def test_a_vertex_job_outlives_both_attempts_of_train_model(monkeypatch):
    """train-model retries in the same Vertex AI job, so the job's time cap must hold both attempts."""
    import flows.train_model as tm
    from tasks.training import training_timeout_s

    template = json.loads((REPO / "deployments" / "vertex-tpu-pool.json").read_text())
    props = template["variables"]["properties"]
    monkeypatch.setenv("COVID_TRAIN_TIMEOUT_S", props["env"]["default"]["COVID_TRAIN_TIMEOUT_S"])
    flow = tm.train_model_flow
    # In the job, the flow's timeout is what this environment variable makes it at import.
    attempts = 1 + flow.retries
    needed = attempts * training_timeout_s() + flow.retries * flow.retry_delay_seconds
    assert needed <= props["maximum_run_time_hours"]["default"] * 3600, (needed, attempts)


def test_a_child_run_has_a_deadline_even_when_none_is_set(monkeypatch):
    """A training child whose worker died stays Running: with no model_timeout_s it is cancelled after
    the train-model flow's limit for both its attempts plus a grace period, never polled forever."""
    import flows.train_model as tm
    from tasks.training import RETRY_GRACE_S, default_model_deadline_s

    monkeypatch.setenv("COVID_TRAIN_TIMEOUT_S", "1000")
    flow = tm.train_model_flow
    deadline = default_model_deadline_s()
    assert deadline == 2 * 1000 + RETRY_GRACE_S
    assert deadline > (1 + flow.retries) * 1000 + flow.retries * flow.retry_delay_seconds  # both attempts fit
