"""compose.yaml without a docker engine: schema-valid, internally consistent, every command a real `uniopd` command
line, and the CPU variant's teachers, rollout server and trainer run end to end as processes on loopback."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import redis
import yaml

from tests.conftest import RedisServer
from trainer.config import RunConfig
from trainer.run_log import read_log
from uniopd.cli import build_parser
from uniopd.launch import ServerProcess, free_port
from uniopd.tiny_models import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "opd-tiny"
SERVERS = ["teacher-math", "teacher-code", "teacher-strong", "rollout"]
MODELS = {"student": 0, "math-teacher": 1, "code-teacher": 2, "strong-teacher": 3}  # what `models prepare` writes
TEAM_KEY, ADMIN_KEY = "compose-team-key", "compose-admin-key"
ENV = {"UNIOPD_TEACHER_KEYS": TEAM_KEY, "UNIOPD_TEACHER_API_KEY": TEAM_KEY, "UNIOPD_ROLLOUT_ADMIN_KEY": ADMIN_KEY,
       "UNIOPD_TRAIN_ARGS": "--set schedule.steps=2 --set schedule.checkpoint_every=2 --set schedule.eval_samples=1"
                            " --set rollout.max_tokens=12 --set algorithm.prompts_per_step=4"
                            " --set algorithm.samples_per_prompt=2 --set algorithm.micro_batch_size=4"}
_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?)([-?])([^}]*))?\}|\$(\w+)")


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution: $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, colon, op, arg = m.group(1) or m.group(5), m.group(2), m.group(3), m.group(4)
        have = env.get(name)
        missing = have is None or (colon == ":" and have == "")
        if op == "?" and missing:
            raise KeyError(f"${name} is required: {arg}")
        return arg if op == "-" and missing else have or ""

    return _VAR.sub(one, value)


def load(name: str, env: dict[str, str] | None = None) -> dict:
    tree = yaml.safe_load((ROOT / name).read_text())
    return interpolate({k: v for k, v in tree.items() if not k.startswith("x-")}, env or {})


def argv(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else command


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def parser_domains(args: list[str]) -> list[str]:
    return build_parser().parse_args(args).domain


def mounts(service: dict) -> dict[str, str]:
    """Container path -> volume source (a named volume or a host path)."""
    return {target: source for source, target, *_ in (v.split(":") for v in service.get("volumes", []))}


@pytest.fixture(scope="module")
def compose() -> dict:
    return load("compose.yaml", ENV)


def test_compose_files_follow_the_compose_spec():
    cli = Path(sys.executable).parent / "check-jsonschema"
    done = subprocess.run([str(cli), "--builtin-schema", "vendor.compose-spec", "compose.yaml", "compose.gpu.yaml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_uniopd_command_parses_with_the_real_cli(compose):
    parser = build_parser()
    for name, service in compose["services"].items():
        if "redis" in service.get("image", ""):
            continue
        try:
            args = parser.parse_args(argv(service))
        except SystemExit:
            pytest.fail(f"{name}: {service['command']!r} is not a uniopd command line")
        if args.command in ("teacher", "rollout"):
            assert args.host == "0.0.0.0", f"{name} must listen on the container network"
            assert args.model.parent == Path("/assets/models") and args.model.name in MODELS, name
    assert parser.parse_args(argv(compose["services"]["models"])).out == Path("/assets")


def test_teachers_run_one_thread_each_on_cpu_unless_told(compose):
    teachers = [name for name in compose["services"] if name.startswith("teacher-")]
    assert teachers and all(compose["services"][t]["environment"]["OMP_NUM_THREADS"] == "1" for t in teachers)
    four = load("compose.yaml", {**ENV, "UNIOPD_TEACHER_THREADS": "4"})["services"]
    assert all(four[t]["environment"]["OMP_NUM_THREADS"] == "4" for t in teachers)


def test_services_references_ports_and_volumes_agree(compose):
    services, volumes = compose["services"], compose.get("volumes") or {}
    for name, service in services.items():
        for dep, how in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"
        for source in mounts(service).values():
            if source.startswith((".", "/", "~")):
                assert (ROOT / source).exists(), f"{name}: bind source {source} missing"
            else:
                assert source in volumes, f"{name}: volume {source} is not declared"
        if name in SERVERS:
            port = option(argv(service), "--port")
            assert all(p.split(":")[-1] == port for p in service.get("ports", [])), f"{name}: ports vs --port {port}"
            assert f"http://127.0.0.1:{port}/readyz" in " ".join(service["healthcheck"]["test"]), name
            assert service["depends_on"]["models"]["condition"] == "service_completed_successfully"
            assert mounts(service)["/assets"] == "models" and service["volumes"][0].endswith(":ro"), name
    assert set(services["trainer"]["depends_on"]) == {"models", "redis", "teacher-math", "teacher-code", "rollout"}
    assert {name for name, s in services.items() if "ports" in s} == {n for n in SERVERS if n.startswith("teacher")}
    scaled = load("compose.yaml", {**ENV, "UNIOPD_MATH_PORT": ""})["services"]["teacher-math"]
    assert scaled["ports"] == ["127.0.0.1::8101"]  # an ephemeral host port per replica, so --scale works


def test_every_variable_is_documented_in_the_env_example():
    documented = set(re.findall(r"^#?(UNIOPD_\w+)=", (ROOT / "docker" / "env.example").read_text(), re.M))
    for name in ("compose.yaml", "compose.gpu.yaml"):
        used = {m.group(1) or m.group(5) for m in _VAR.finditer((ROOT / name).read_text()) if m.group(0) != "$$"}
        assert used <= documented, f"{name}: {sorted(used - documented)} missing from docker/env.example"


def test_gpu_variant_adds_reservations_to_existing_services(compose):
    gpu = load("compose.gpu.yaml")
    assert set(gpu["services"]) <= set(compose["services"])
    for name, service in gpu["services"].items():
        assert (ROOT / service["build"]["dockerfile"]).is_file() and service["build"]["dockerfile"].endswith(".gpu")
        if name != "models":
            (device,) = service["deploy"]["resources"]["reservations"]["devices"]
            assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
    for dockerfile in ("docker/Dockerfile.cpu", "docker/Dockerfile.gpu"):
        text = (ROOT / dockerfile).read_text()
        assert 'ENTRYPOINT ["uniopd"]' in text  # so a service's command is exactly what the CLI parses
        assert re.findall(r"^USER (\S+)", text, re.M)[-1] not in ("root", "0"), dockerfile


def test_trainer_config_names_the_compose_services(compose):
    services = compose["services"]
    trainer = services["trainer"]
    config_file = ROOT / mounts(trainer)[option(argv(trainer), "--config")]
    config = RunConfig.model_validate(yaml.safe_load(config_file.read_text()))
    for domain, pool in config.teachers.items():
        for url in pool.urls:
            host, port = urlsplit(url).hostname, str(urlsplit(url).port)
            args = argv(services[host])
            assert option(args, "--port") == port and domain in parser_domains(args), url
    rollout = urlsplit(config.rollout.url)
    assert option(argv(services[rollout.hostname]), "--port") == str(rollout.port)
    assert urlsplit(config.cache.url).hostname == "redis" and urlsplit(config.cache.url).port == 6379
    for key in (config.rollout.admin_key_env, *(p.api_key_env for p in config.teachers.values())):
        assert key in trainer["environment"], f"{key} is not passed to the trainer"
    for path in (config.student.model, *config.data.train, *config.data.eval, config.output_dir):
        assert any(path.is_relative_to(target) for target in mounts(trainer)), f"{path} is on no volume"


@contextlib.contextmanager
def lru_redis(args: list[str]) -> Iterator[str]:
    """A `redis-server ...` command line (compose's or a manifest's) started on a loopback port; checks that it is
    the score cache it should be (memory only, LRU eviction under a bound) and yields its URL."""
    port = free_port()
    proc = subprocess.Popen([*args, "--port", str(port), "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, socket_timeout=2, decode_responses=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
                time.sleep(0.02)
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
        assert int(client.config_get("maxmemory")["maxmemory"]) > 0
        assert client.config_get("save") == {"save": ""}
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.e2e
def test_redis_command_starts_with_lru_eviction(compose):
    with lru_redis(argv(compose["services"]["redis"])):
        pass


# ---- the CPU variant end to end ----------------------------------------------------------------------------------


def localize(value, host_path: Callable[[str], str], hosts: dict[str, str]):
    """A run config made local: absolute paths through `host_path`, URLs' HOST:PORT (a service name) through
    `hosts` (to a loopback port)."""
    if isinstance(value, dict):
        return {k: localize(v, host_path, hosts) for k, v in value.items()}
    if isinstance(value, list):
        return [localize(v, host_path, hosts) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        return host_path(value)
    if isinstance(value, str) and "://" in value:
        scheme, _, rest = value.partition("://")
        host, slash, path = rest.partition("/")
        return f"{scheme}://{hosts.get(host, host)}{slash}{path}"
    return value


def spawn(args: list[str], env: dict[str, str], log: Path, port: int) -> ServerProcess:
    """A server process on a loopback port, its output in `log`."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    return ServerProcess(proc, f"http://127.0.0.1:{port}", log)


class Stack:
    """compose.yaml's services as local processes: the compose network's DNS becomes loopback ports, volumes
    become directories (the models volume is pre-filled with random tiny models instead of `models prepare`)."""

    def __init__(self, compose: dict, root: Path, redis_url: str) -> None:
        self.services, self.root = compose["services"], root
        self.mounts = {name: mounts(service) for name, service in self.services.items()}
        self.ports = {name: free_port() for name in SERVERS}
        self.hosts = {f"{n}:{self.port(n)}": f"127.0.0.1:{p}" for n, p in self.ports.items()}
        self.hosts["redis:6379"] = f"127.0.0.1:{urlsplit(redis_url).port}"

    def port(self, name: str) -> str:
        return option(argv(self.services[name]), "--port")

    def host_path(self, name: str, path: str) -> str:
        for target, source in self.mounts[name].items():
            if path == target or path.startswith(target + "/"):
                if source.startswith("."):
                    source = ROOT / source  # a bind mount from the repository
                elif not source.startswith("/"):
                    source = self.root / source  # a named volume: a directory of its own
                return f"{source}{path[len(target):]}"
        return path

    def command(self, name: str) -> list[str]:
        args = [self.host_path(name, a) if a.startswith("/") else a for a in argv(self.services[name])]
        if name in self.ports:
            args[args.index("--host") + 1], args[args.index("--port") + 1] = "127.0.0.1", str(self.ports[name])
        return [sys.executable, "-m", "uniopd", *args]

    def env(self, name: str) -> dict[str, str]:
        return {**os.environ, **self.services[name].get("environment", {})}

    def healthy(self, name: str) -> bool:
        """The service's own healthcheck command, pointed at its loopback port."""
        cmd, _python, *args = self.services[name]["healthcheck"]["test"]
        assert cmd == "CMD"
        args = [a.replace(f":{self.port(name)}/", f":{self.ports[name]}/") for a in args]
        return subprocess.run([sys.executable, *args], capture_output=True, timeout=10).returncode == 0

    def mount_local_config(self, name: str) -> None:
        """The trainer's config file, with the compose network's host names and volume paths made local."""
        target = option(argv(self.services[name]), "--config")
        tree = localize(yaml.safe_load(Path(self.host_path(name, target)).read_text()),
                        lambda path: self.host_path(name, path), self.hosts)
        config = self.root / "run.yaml"
        config.write_text(yaml.safe_dump(tree))
        self.mounts[name][target] = str(config)


@pytest.fixture
def assets(tmp_path) -> Path:
    root = tmp_path / "models"  # the `models` named volume
    for name, seed in MODELS.items():
        build_tiny_model(root / "models" / name, "qwen3", seed=seed)
    (root / "data").mkdir()
    for split in ("math_train", "math_eval", "code_train", "code_eval"):
        shutil.copy(EXAMPLE / f"{split}.jsonl", root / "data" / f"{split}.jsonl")
    return tmp_path


@pytest.mark.e2e
def test_cpu_variant_runs_end_to_end(compose, assets):
    redis_server = RedisServer().start()
    stack = Stack(compose, assets, redis_server.url)
    servers: dict[str, ServerProcess] = {}
    try:
        for name in SERVERS:
            servers[name] = spawn(stack.command(name), stack.env(name), assets / f"{name}.log", stack.ports[name])
        deadline = time.monotonic() + 120
        for name, server in servers.items():
            while not stack.healthy(name):
                assert server.proc.poll() is None, f"{name} exited:\n{server.log()[-3000:]}"
                assert time.monotonic() < deadline, f"{name} not ready:\n{server.log()[-3000:]}"
                time.sleep(0.3)
        unauthorized = httpx.post(servers["teacher-math"].url + "/v1/score", timeout=10,
                                  json={"items": [{"input_ids": [1, 2, 3], "response_start": 1}]})
        assert unauthorized.status_code == 401  # the env-file key reached the teacher

        stack.mount_local_config("trainer")
        done = subprocess.run(stack.command("trainer"), capture_output=True, text=True, timeout=300,
                              env=stack.env("trainer"))
        assert done.returncode == 0, done.stderr[-4000:]
        rows = read_log(assets / "runs" / "compose" / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2]
        assert all(r["masked_samples"] == 0 and r["domain/math/scored"] + r["domain/code/scored"] == 8 for r in rows)
        assert (assets / "runs" / "compose" / "checkpoints" / "step-000002").is_dir()
    finally:
        for server in servers.values():
            server.stop()
        redis_server.stop()
