"""docker-compose.yml and the Dockerfile it builds, checked without Docker: the file is valid by the
compose-spec JSON schema that check-jsonschema ships (through `jsonschema` and through the
check-jsonschema CLI), the validator rejects files that are not, and the stack is the one
docs/deploy.md describes."""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SERVICES = {"postgres", "api", "ray-head", "ray-worker", "optuna-dashboard"}
REQUIRED = {"RAY_AUTH_TOKEN", "POSTGRES_PASSWORD"}  # what .env must set; everything else has a default
ENV = {"RAY_AUTH_TOKEN": "a-ray-secret", "POSTGRES_PASSWORD": "a-db-password"}

# Compose's interpolation: ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message};
# `$$` is a literal dollar sign.
_BRACED = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """`text` with its ${...} replaced the way `docker compose` does; a missing required variable raises
    KeyError with the file's message."""

    def substitute(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"] or "", match["arg"]
        value = env.get(name)
        unset = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return arg if unset else value
        if op.endswith("?") and unset:
            raise KeyError(f"{name}: {arg}")
        return value or ""

    parts = text.split("$$")
    return "$".join(_BRACED.sub(substitute, part) for part in parts)


def _schema() -> dict:
    resource = importlib.resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(resource.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = _schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@pytest.fixture(scope="module")
def raw() -> str:
    return COMPOSE.read_text(encoding="utf-8")


def _resolve(node: object, env: dict[str, str]) -> object:
    """Every string of a parsed compose file interpolated (compose substitutes values, not comments)."""
    if isinstance(node, dict):
        return {_resolve(k, env): _resolve(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(item, env) for item in node]
    return interpolate(node, env) if isinstance(node, str) else node


def _strings(node: object) -> list[str]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return [node] if isinstance(node, str) else []


@pytest.fixture(scope="module")
def compose(raw: str) -> dict:
    """The file as `docker compose` sees it with a complete .env: anchors merged, variables substituted."""
    return _resolve(yaml.safe_load(raw), ENV)


def _errors(validator: jsonschema.protocols.Validator, document: object) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(document)]


def _check_jsonschema_cli(path: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def _command(service: dict) -> str:
    command = service["command"]
    return command if isinstance(command, str) else shlex.join(command)


# ---------------------------------------------------------------- the file is compose, and only compose


def test_compose_file_is_valid_by_the_compose_spec_schema(raw: str, compose: dict, validator) -> None:
    assert _errors(validator, yaml.safe_load(raw)) == []  # as written, variables unresolved
    assert _errors(validator, compose) == []  # after interpolation


def test_check_jsonschema_cli_accepts_the_compose_file() -> None:
    result = _check_jsonschema_cli(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout


def _device(compose: dict) -> dict:
    return compose["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]


# What breaks the file, and the part of it the validator must name in its complaint.
BROKEN = {
    "a service with an unknown key": (lambda c: c["services"]["api"].update(colour="blue"), "colour"),
    "ports as an int": (lambda c: c["services"]["api"].update(ports=8000), "services/api/ports"),
    "an unknown depends_on condition": (
        lambda c: c["services"]["api"]["depends_on"]["postgres"].update(condition="service_happy"),
        "services/api/depends_on",
    ),
    "a device reservation with an unknown key": (lambda c: _device(c).update(gpus=1), "devices/0"),
    "healthcheck retries as a list": (
        lambda c: c["services"]["postgres"]["healthcheck"].update(retries=[10]),
        "healthcheck/retries",
    ),
    "an unknown top-level key": (lambda c: c.update(service={}), "'service'"),
}


@pytest.mark.parametrize(("break_it", "named"), BROKEN.values(), ids=BROKEN.keys())
def test_schema_rejects_a_broken_variant(compose: dict, validator, break_it, named: str) -> None:
    broken = copy.deepcopy(compose)
    break_it(broken)
    errors = _errors(validator, broken)
    assert errors, "the validator accepted a file that is not valid compose"
    assert any(named in error for error in errors), errors


def test_check_jsonschema_cli_rejects_a_broken_variant(compose: dict, tmp_path: Path) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["api"]["ports"] = 8000
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken), encoding="utf-8")
    result = _check_jsonschema_cli(path)
    assert result.returncode != 0
    assert "ports" in result.stdout + result.stderr


# ---------------------------------------------------------------- variables


def test_every_interpolation_is_defaulted_or_required_with_a_message(raw: str) -> None:
    text = "\n".join(_strings(yaml.safe_load(raw))).replace("$$", "")
    braced = list(_BRACED.finditer(text))
    assert braced
    for match in braced:
        op, arg = match["op"] or "", match["arg"]
        assert op, f"{match[0]} has neither a default (:-) nor a required message (:?)"
        assert arg.strip() or op.endswith("-"), f"{match[0]} is required but says nothing about what to set"
    assert "$" not in _BRACED.sub("", text), "a $NAME without braces, or a ${...} this test does not read"
    required = {m["name"] for m in braced if (m["op"] or "").endswith("?")}
    assert required == REQUIRED


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_a_missing_required_variable_stops_compose_with_its_message(raw: str, missing: str) -> None:
    env = {name: value for name, value in ENV.items() if name != missing}
    with pytest.raises(KeyError, match=f"{missing}: set {missing} in .env"):
        _resolve(yaml.safe_load(raw), env)


def test_interpolation_helper_follows_compose_rules() -> None:
    assert interpolate("${A:-x} ${A-x} $${A} ${B:?need B}", {"A": "", "B": "b"}) == "x  ${A} b"


# ---------------------------------------------------------------- the stack


def test_the_stack_has_its_five_services(compose: dict) -> None:
    assert set(compose["services"]) == SERVICES


def test_postgres_keeps_its_data_in_a_named_volume_and_has_a_healthcheck(compose: dict) -> None:
    postgres = compose["services"]["postgres"]
    assert postgres["image"].startswith("postgres:16")
    volume = next(v.split(":")[0] for v in postgres["volumes"] if v.endswith(":/var/lib/postgresql/data"))
    assert volume in compose["volumes"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert postgres["ports"] == ["127.0.0.1:5433:5432"]
    assert postgres["environment"]["POSTGRES_PASSWORD"] == ENV["POSTGRES_PASSWORD"]


def test_api_migrates_then_serves_once_postgres_is_healthy(compose: dict) -> None:
    api = compose["services"]["api"]
    assert api["depends_on"]["postgres"]["condition"] == "service_healthy"
    command = _command(api)
    upgrade, serve = command.find("illava-tune db upgrade"), command.find("illava-tune serve")
    assert 0 <= upgrade < serve, command
    assert "--host 0.0.0.0 --port 8000" in command[serve:]
    assert api["ports"] == ["127.0.0.1:8000:8000"]
    assert "/readyz" in " ".join(api["healthcheck"]["test"])


def test_api_joins_the_ray_cluster_before_serving(compose: dict) -> None:
    """A Ray driver attaches to a raylet on its own machine, so the api container (where the job drivers
    run) starts one without resources; its address is the RAY_ADDRESS the drivers use."""
    api = compose["services"]["api"]
    command = _command(api)
    assert api["environment"]["RAY_ADDRESS"] == "ray-head:6379"
    join = command.find('ray start --address="$RAY_ADDRESS"')
    assert 0 <= join < command.find("illava-tune serve"), command
    assert "--num-cpus=0" in command and "--num-gpus=0" in command
    assert api["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_api_and_optuna_dashboard_use_the_same_database(compose: dict) -> None:
    api_url = make_url(compose["services"]["api"]["environment"]["DATABASE_URL"])
    dashboard_url = make_url(compose["services"]["optuna-dashboard"]["command"][0])
    for url in (api_url, dashboard_url):
        assert (url.host, url.port, url.database, url.username) == ("postgres", 5432, "illava", "illava")
        assert url.password == ENV["POSTGRES_PASSWORD"]
    # The official image ships psycopg2 (SQLAlchemy's default for postgresql://), not psycopg 3.
    assert dashboard_url.drivername in ("postgresql", "postgresql+psycopg2")
    assert compose["services"]["optuna-dashboard"]["image"].startswith("ghcr.io/optuna/optuna-dashboard:")


def test_ray_head_and_worker_commands(compose: dict) -> None:
    head, worker = compose["services"]["ray-head"], compose["services"]["ray-worker"]
    head_command = _command(head)
    for flag in ("ray start --head", "--port=6379", "--dashboard-host=0.0.0.0", "--num-gpus=0", "--block"):
        assert flag in head_command
    assert int(re.search(r"--num-cpus=(\d+)", head_command)[1]) <= 2
    worker_command = _command(worker)
    assert "ray start --address=ray-head:6379" in worker_command and "--block" in worker_command
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_ray_worker_reserves_the_gpus(compose: dict) -> None:
    devices = compose["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    gpu = next(d for d in devices if "gpu" in d["capabilities"])
    assert gpu["driver"] == "nvidia"
    assert gpu.get("count") == "all" or isinstance(gpu.get("count"), int) or gpu.get("device_ids")


def test_ray_worker_builds_with_cuda_torch_and_the_rest_with_cpu_torch(compose: dict) -> None:
    services = compose["services"]
    cuda_index = services["ray-worker"]["build"]["args"]["TORCH_INDEX_URL"]
    assert re.search(r"/whl/cu\d+$", cuda_index), cuda_index
    for name in ("api", "ray-head"):
        assert services[name]["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
        assert services[name]["image"] == services["api"]["image"] != services["ray-worker"]["image"]


def test_every_ray_process_shares_one_token(compose: dict) -> None:
    services = compose["services"]
    for name in ("api", "ray-head", "ray-worker"):
        environment = services[name]["environment"]
        assert environment["RAY_AUTH_MODE"] == "token", name
        assert environment["RAY_AUTH_TOKEN"] == ENV["RAY_AUTH_TOKEN"], name


def test_a_service_waited_on_as_healthy_has_a_healthcheck(compose: dict) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency} to be healthy"


def test_published_ports_are_bound_to_localhost(compose: dict) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_named_volumes_are_declared(compose: dict) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "~")):
                assert source in compose["volumes"], f"{name} mounts undeclared volume {source}"


def test_job_logs_outlive_the_api_container(compose: dict) -> None:
    """The drivers the api starts write to ./.illava-jobs in the image's working directory."""
    volumes = compose["services"]["api"]["volumes"]
    assert any(v.endswith(":/home/illava/.illava-jobs") and v.split(":")[0] in compose["volumes"] for v in volumes)
    assert "WORKDIR /home/illava" in DOCKERFILE.read_text(encoding="utf-8")


# ---------------------------------------------------------------- what the compose file builds


def test_every_build_context_and_dockerfile_exists(compose: dict) -> None:
    builds = [s["build"] for s in compose["services"].values() if "build" in s]
    assert len(builds) == 3
    for build in builds:
        build = {"context": build} if isinstance(build, str) else build
        context = ROOT / build.get("context", ".")
        assert context.is_dir(), context
        assert (context / build.get("dockerfile", "Dockerfile")).is_file()


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(k.upper(), v.strip()) for k, _, v in (line.strip().partition(" ") for line in joined.splitlines()) if k]


def test_dockerfile_installs_the_project_and_runs_as_a_non_root_user() -> None:
    instructions = _instructions(DOCKERFILE.read_text(encoding="utf-8"))
    runs = [args for kind, args in instructions if kind == "RUN"]
    assert any(re.search(r"pip install (\S+ )*\"?\.(\$\{\w+\}|\[[\w,]+\])?\"?(\s|$)", run) for run in runs), runs
    assert any("useradd" in run for run in runs)
    users = [args for kind, args in instructions if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert instructions[0][0] in ("ARG", "FROM") and any(a.startswith("${PYTHON_IMAGE}") for k, a in instructions)
    assert any(a.startswith("PYTHON_IMAGE=python:3.11") for k, a in instructions if k == "ARG")


def test_dockerfile_pins_versions_the_project_accepts() -> None:
    """torch and Ray versions of the image, within the ranges pyproject.toml declares."""
    args = dict(
        a.split("=", 1) for k, a in _instructions(DOCKERFILE.read_text(encoding="utf-8")) if k == "ARG" and "=" in a
    )
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    ranges = {r.name: r.specifier for r in map(Requirement, dependencies)}
    assert ranges["torch"].contains(args["TORCH_VERSION"])
    assert ranges["ray"].contains(args["RAY_VERSION"])
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_image() -> None:
    ignored = set((ROOT / ".dockerignore").read_text(encoding="utf-8").split())
    assert {".env", ".venv", ".git", "illava.db", ".illava-jobs"} <= ignored
    assert "README.md" not in ignored and "pyproject.toml" not in ignored  # the install reads both


def test_deploy_doc_covers_the_required_settings_and_commands() -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    for text in (*REQUIRED, "docker compose up -d --build", "illava-tune token create", "load_manifest"):
        assert text in doc, text
