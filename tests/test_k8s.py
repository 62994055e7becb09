"""deploy/k8s without a cluster: both overlays render with `kubectl kustomize`, every object validates against the
Kubernetes API schema (kubernetes-validate, strict), the objects agree with each other and with compose.yaml, every
command is a real `uniopd` command line, and the CPU overlay's teacher, rollout server, Redis and trainer containers
run as processes on loopback, with the team-file Secret updated the way the kubelet updates it."""

from __future__ import annotations

import base64
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import kubernetes_validate
import pytest
import yaml

from services.common.auth import read_keys_file
from tests.test_compose import ENV, assets, load, localize, lru_redis, option, spawn  # noqa: F401 (assets: fixture)
from trainer.config import RunConfig
from trainer.run_log import read_log
from uniopd.cli import build_parser
from uniopd.launch import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES = "1.32.0"  # the API the objects are validated against (its schemas ship in kubernetes-validate>=1.32)
TEACHERS = {"teacher-math", "teacher-code", "teacher-strong"}
SERVERS = {*TEACHERS, "rollout"}
TEAM_FILE = "/etc/uniopd/teams/teams.yaml"
GPU_SETTINGS = {"UNIOPD_BACKEND": "vllm", "UNIOPD_DTYPE": "bfloat16"}  # what compose.gpu.yaml's users set in .env
_VAR = re.compile(r"\$\((\w+)\)")


@cache
def render(directory: Path) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: it renders deploy/k8s (`kubectl kustomize`). Install it "
                    "(Debian: apt-get install kubernetes-client, as .ci/run does) or put it on PATH.")
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {directory}:\n{done.stderr}"
    return tuple(o for o in yaml.safe_load_all(done.stdout) if o)


class Manifests:
    """One rendered overlay, looked up the way the kubelet resolves references."""

    def __init__(self, overlay: str, directory: Path | None = None) -> None:
        self.overlay, self.objects = overlay, render(directory or K8S / "overlays" / overlay)

    def named(self, kind: str) -> dict[str, dict]:
        return {o["metadata"]["name"]: o for o in self.objects if o["kind"] == kind}

    def workloads(self) -> dict[str, dict]:
        """Deployments and Jobs by name: their pod specs."""
        return {**{n: o["spec"]["template"] for n, o in self.named("Deployment").items()},
                **{n: o["spec"]["template"] for n, o in self.named("Job").items()}}

    def data(self, kind: str, name: str) -> dict[str, str]:
        obj = self.named(kind)[name]
        if kind == "Secret":
            return {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}
        return obj.get("data", {})

    def env(self, container: dict) -> dict[str, str]:
        """The container's env; a configMapKeyRef or secretKeyRef that names no key raises KeyError."""
        env = {}
        for var in container.get("env", []):
            env[var["name"]] = var.get("value")
            for ref, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                if ref in var.get("valueFrom", {}):
                    env[var["name"]] = self.data(kind, var["valueFrom"][ref]["name"])[var["valueFrom"][ref]["key"]]
        return env

    def argv(self, container: dict) -> list[str]:
        """command + args, $(VAR) expanded from the container's env as the kubelet does; a uniopd image's
        entrypoint is `uniopd`, so its args alone are what the CLI parses."""
        env = self.env(container)
        words = [*container.get("command", []), *container.get("args", [])]
        return [_VAR.sub(lambda m: env[m.group(1)], word) for word in words]

    def container(self, workload: str, init: bool = False) -> dict:
        """The workload's (first) container, or its (first) init container."""
        return self.workloads()[workload]["spec"]["initContainers" if init else "containers"][0]

    def service_of(self, host: str, port: int) -> str:
        """The Deployment behind http://HOST:PORT, checking that the Service forwards PORT to a container port."""
        service = self.named("Service")[host]["spec"]
        (target,) = [p["targetPort"] for p in service["ports"] if p["port"] == port]
        (name,) = [n for n, o in self.named("Deployment").items()
                   if service["selector"].items() <= o["spec"]["template"]["metadata"]["labels"].items()]
        ports = self.container(name)["ports"]
        assert any(target in (p.get("name"), p["containerPort"]) and p["containerPort"] == port for p in ports)
        return name


def team_keys(k8s: Manifests) -> set[str]:
    """The keys of the team file in the Secret uniopd-teams, read by the teachers' own parser."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "teams.yaml").write_text(k8s.data("Secret", "uniopd-teams")["teams.yaml"])
        return {k for keys in read_keys_file(Path(tmp) / "teams.yaml").values() for k in keys}


def mounts(pod: dict, container: dict) -> dict[str, dict]:
    """Mount path -> the pod volume mounted there (with the mount's readOnly and subPath)."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    return {m["mountPath"]: {**volumes[m["name"]], "mount": m} for m in container.get("volumeMounts", [])}


def mounted(pod: dict, container: dict, path: str) -> tuple[str, dict]:
    """(the path inside its volume, the volume) for an absolute path in a container."""
    for target, volume in sorted(mounts(pod, container).items(), key=lambda m: -len(m[0])):
        if path == target or path.startswith(target + "/"):
            return path[len(target):].lstrip("/"), volume
    raise AssertionError(f"{path} is on no volume of {container['name']}")


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def k8s(request) -> Manifests:
    return Manifests(request.param)


def test_every_object_validates_against_the_kubernetes_api_schema(k8s):
    for obj in k8s.objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{k8s.overlay}: {obj['kind']}/{obj['metadata']['name']} at {list(exc.path)}: {exc.message}")
    assert set(k8s.named("Deployment")) == set(k8s.named("Service")) == {*SERVERS, "redis"}
    assert set(k8s.named("Job")) == ({"trainer", "models"} if k8s.overlay == "cpu" else {"trainer"})


def test_services_select_their_deployment_and_probes_reach_its_port(k8s):
    for name, service in k8s.named("Service").items():
        for port in service["spec"]["ports"]:
            assert k8s.service_of(name, port["port"]) == name
    for name, deployment in k8s.named("Deployment").items():
        pod = deployment["spec"]["template"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items(), name
        (container,) = pod["spec"]["containers"]
        ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind, {})
            if port := (probe.get("httpGet") or probe.get("tcpSocket") or {}).get("port"):
                assert port in ports or port in ports.values(), f"{name}: {kind} on port {port}"
        if name in SERVERS:
            assert int(option(k8s.argv(container), "--port")) == ports["http"], name
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
    assert k8s.container("redis")["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]
    assert k8s.named("Deployment")["rollout"]["spec"]["replicas"] == 1  # weights are pushed to one sampler


def test_commands_are_compose_s_and_parse_with_the_real_cli(k8s):
    """Each container runs its compose service's command (compose's `command` is the args after the entrypoint),
    teachers with --api-keys added; the GPU overlay as compose.gpu.yaml with vLLM in bfloat16."""
    gpu = k8s.overlay == "gpu"
    compose = load("compose.yaml", GPU_SETTINGS if gpu else {})["services"]
    images = {**compose, **load("compose.gpu.yaml")["services"]} if gpu else compose
    parser = build_parser()
    for name, pod in k8s.workloads().items():
        (container,) = pod["spec"]["containers"]
        expected = shlex.split(compose[name]["command"]) + (["--api-keys", TEAM_FILE] if name in TEACHERS else [])
        assert k8s.argv(container) == expected, name
        assert all(c["image"] == images[name]["image"] for c in pod["spec"].get("initContainers", [container]))
        if name == "redis":
            continue
        assert "command" not in container, f"{name}: the image's entrypoint is `uniopd`"
        args = parser.parse_args(expected)
        if name in SERVERS:
            assert args.host == "0.0.0.0" and args.model.parent == Path("/assets/models"), name
            assert (args.backend, args.dtype) == (("vllm", "bfloat16") if gpu else ("hf", "float32")), name
        if name in TEACHERS:
            assert k8s.env(container)["OMP_NUM_THREADS"] == compose[name]["environment"]["OMP_NUM_THREADS"]
            assert args.api_keys == Path(TEAM_FILE)
        limits = container["resources"]["limits"]
        assert limits.get("nvidia.com/gpu") == (1 if gpu and name != "models" else None), name
        if gpu and name in TEACHERS:  # one GPU each: replace a pod rather than start one beside it
            assert k8s.named("Deployment")[name]["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_volumes_secrets_and_config_maps_are_defined_and_update_in_place(k8s):
    for name, pod in k8s.workloads().items():
        for volume in pod["spec"].get("volumes", []):
            if claim := volume.get("persistentVolumeClaim"):
                assert claim["claimName"] in k8s.named("PersistentVolumeClaim"), name
            if "configMap" in volume:
                assert volume["configMap"]["name"] in k8s.named("ConfigMap"), name
            if "secret" in volume:
                assert volume["secret"]["secretName"] in k8s.named("Secret"), name
        for container in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            k8s.env(container)  # every configMapKeyRef / secretKeyRef names an existing key
            for target, volume in mounts(pod, container).items():
                if "configMap" in volume or "secret" in volume:  # a subPath mount never sees an update
                    assert "subPath" not in volume["mount"], f"{name}: {target}"
                if volume.get("persistentVolumeClaim", {}).get("claimName") == "uniopd-assets":
                    writes = name == "models"  # only the models Job writes the models; servers mount them read-only
                    assert volume["mount"].get("readOnly", False) != writes, f"{name}: {target}"
            for arg in k8s.argv(container):
                if arg.startswith("/") and arg != "/":
                    inside, volume = mounted(pod, container, arg)
                    for kind, key in (("ConfigMap", "configMap"), ("Secret", "secret")):
                        if key in volume:
                            ref = volume[key].get("name") or volume[key].get("secretName")
                            assert inside in k8s.data(kind, ref), f"{name}: {arg} is not a key of {ref}"
    # the team file and the run config are updated in place (no name hash), so the mounted files change under the
    # running teachers and trainer, which reload them; the other generated objects roll their pods when they change
    assert {"uniopd-teams"} <= set(k8s.named("Secret")) and {"uniopd-run"} <= set(k8s.named("ConfigMap"))
    for pod in (k8s.workloads()[t] for t in TEACHERS):
        assert mounted(pod, pod["spec"]["containers"][0], TEAM_FILE)[1]["secret"]["secretName"] == "uniopd-teams"
    for pod in (k8s.workloads()[s] for s in SERVERS):  # each server waits for its model (compose's depends_on)
        model = option(k8s.argv(pod["spec"]["containers"][0]), "--model")
        assert k8s.argv(pod["spec"]["initContainers"][0])[1:] == ["/opt/uniopd/wait/wait_for.py",
                                                                  f"{model}/config.json"]


def test_trainer_job_resumes_from_its_claim_and_calls_the_services(k8s):
    job = k8s.named("Job")["trainer"]["spec"]
    pod, trainer = job["template"], k8s.container("trainer")
    assert job["backoffLimit"] >= 1 and pod["spec"]["restartPolicy"] in ("Never", "OnFailure")
    args = build_parser().parse_args(k8s.argv(trainer))
    assert args.resume, "a replaced pod must continue from the last checkpoint"
    inside, volume = mounted(pod, trainer, str(args.config))
    config = RunConfig.model_validate(yaml.safe_load(k8s.data("ConfigMap", volume["configMap"]["name"])[inside]))
    _, runs = mounted(pod, trainer, str(config.output_dir))
    assert runs["persistentVolumeClaim"]["claimName"] == "uniopd-runs" and not runs["mount"].get("readOnly")
    for path in (config.student.model, *config.data.train, *config.data.eval):
        assert mounted(pod, trainer, str(path))[1]["persistentVolumeClaim"]["claimName"] == "uniopd-assets"
    for domain, pool in config.teachers.items():
        for url in pool.urls:
            teacher = k8s.service_of(urlsplit(url).hostname, urlsplit(url).port)
            assert domain in build_parser().parse_args(k8s.argv(k8s.container(teacher))).domain, url
    rollout = urlsplit(config.rollout.url)
    assert k8s.argv(k8s.container(k8s.service_of(rollout.hostname, rollout.port)))[:2] == ["rollout", "serve"]
    cache = urlsplit(config.cache.url)
    assert k8s.service_of(cache.hostname, cache.port) == "redis"
    # the init container waits for what this same config names (compose's depends_on)
    assert k8s.argv(k8s.container("trainer", init=True))[-2:] == ["--config", str(args.config)]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "run.yaml").write_text(k8s.data("ConfigMap", volume["configMap"]["name"])[inside])
        waits = runpy.run_path(str(K8S / "base" / "wait_for.py"))["config_targets"](Path(tmp) / "run.yaml")
    assert set(waits) == {*(f"{u}/readyz" for p in config.teachers.values() for u in p.urls),
                          f"{config.rollout.url}/readyz", config.cache.url, *map(str, config.data.train),
                          *map(str, config.data.eval)}
    # the keys: the trainer's teacher key is one of the team file's, its admin key is the rollout server's
    env = k8s.env(trainer)
    assert {env[p.api_key_env] for p in config.teachers.values()} <= team_keys(k8s)
    assert env[config.rollout.admin_key_env] == k8s.env(k8s.container("rollout"))["UNIOPD_ADMIN_KEYS"]


def test_run_config_is_compose_s_but_for_its_output_dir():
    k8s = yaml.safe_load((K8S / "base" / "live" / "run.yaml").read_text())
    compose = yaml.safe_load((ROOT / "configs" / "compose-run.yaml").read_text())
    assert k8s == {**compose, "output_dir": "/runs/k8s"}


def test_committed_keys_are_placeholders():
    for overlay in ("cpu", "gpu"):
        k8s = Manifests(overlay)
        keys = {v for name in k8s.named("Secret") if name != "uniopd-teams" for v in k8s.data("Secret", name).values()}
        keys |= team_keys(k8s)
        assert keys and all(k.startswith("CHANGE-ME-") for k in keys), f"{overlay}: a real key is committed"


def test_an_operator_overlay_replaces_the_placeholder_keys(tmp_path):
    """README's way to set keys: an overlay of one's own (out of git) replaces both Secrets; the team file's Secret
    keeps its plain name, so it is still updated in place."""
    (tmp_path / "teams.yaml").write_text("teams:\n  alpha: {keys: [alpha-key]}\n  beta: {keys: [beta-key]}\n")
    (tmp_path / "keys.env").write_text("UNIOPD_TEACHER_API_KEY=alpha-key\nUNIOPD_ROLLOUT_ADMIN_KEY=admin-key\n")
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "bases": [os.path.relpath(K8S / "overlays" / "gpu", tmp_path)], "namespace": "opd",
        "secretGenerator": [{"name": "uniopd-teams", "behavior": "replace", "files": ["teams.yaml"]},
                            {"name": "uniopd-keys", "behavior": "replace", "env": "keys.env"}]}))
    mine = Manifests("gpu", tmp_path)
    assert {o["metadata"].get("namespace") for o in mine.objects} == {"opd"}
    assert team_keys(mine) == {"alpha-key", "beta-key"}
    assert mine.env(mine.container("trainer")) == {"UNIOPD_TEACHER_API_KEY": "alpha-key",
                                                   "UNIOPD_ROLLOUT_ADMIN_KEY": "admin-key"}
    for teacher in TEACHERS:
        pod = mine.workloads()[teacher]
        assert mounted(pod, pod["spec"]["containers"][0], TEAM_FILE)[1]["secret"]["secretName"] == "uniopd-teams"


# ---- the CPU overlay's containers as processes -------------------------------------------------------------------


def project(directory: Path, files: dict[str, str]) -> None:
    """What the kubelet does to a Secret or ConfigMap volume, at start and on every update: the files go into a new
    hidden directory, the symlink `..data` is switched to it with one rename, and each key is a symlink through
    `..data`; the old directory is removed."""
    directory.mkdir(parents=True, exist_ok=True)
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    new = Path(tempfile.mkdtemp(prefix="..", dir=directory))
    for key, text in files.items():
        (new / key).write_text(text)
    (directory / "..data_tmp").symlink_to(new.name)
    os.rename(directory / "..data_tmp", directory / "..data")
    for key in files:
        if not (directory / key).is_symlink():
            (directory / key).symlink_to(f"..data/{key}")
    if old:
        shutil.rmtree(directory / old)


class Node:
    """The CPU overlay's pods as local processes: claims are directories, Secret and ConfigMap volumes are projected
    as the kubelet projects them, Services (DNS name:port) are loopback ports."""

    def __init__(self, k8s: Manifests, root: Path, claims: dict[str, Path], hosts: dict[str, str]) -> None:
        self.k8s, self.root, self.claims, self.hosts = k8s, root, claims, hosts

    def host_path(self, pod: dict, container: dict, path: str) -> str:
        inside, volume = mounted(pod, container, path)
        if claim := volume.get("persistentVolumeClaim"):
            return str(self.claims[claim["claimName"]] / inside)
        ref = volume.get("configMap", {}).get("name") or volume["secret"]["secretName"]
        directory = self.root / "volumes" / ref
        if not directory.exists():
            kind = "ConfigMap" if "configMap" in volume else "Secret"
            data = self.k8s.data(kind, ref)
            if ref == "uniopd-run":  # the trainer's run config names Services and its paths: make them local
                main = pod["spec"]["containers"][0]
                data = {k: yaml.safe_dump(localize(yaml.safe_load(v), lambda p: self.host_path(pod, main, p),
                                                   self.hosts)) for k, v in data.items()}
            project(directory, data)
        return str(directory / inside)

    def command(self, workload: str, ports: dict[str, int], init: bool = False) -> list[str]:
        pod, container = self.k8s.workloads()[workload], self.k8s.container(workload, init=init)
        args = [self.host_path(pod, container, a) if a.startswith("/") else a for a in self.k8s.argv(container)]
        if "--port" in args:
            args[args.index("--host") + 1], args[args.index("--port") + 1] = "127.0.0.1", str(ports[workload])
        if args[0] == "python3":
            return [sys.executable, *args[1:]]
        return [sys.executable, "-m", "uniopd", *args]

    def env(self, workload: str) -> dict[str, str]:
        return {**os.environ, **self.k8s.env(self.k8s.container(workload))}

    def init(self, workload: str, ports: dict[str, int], processes: list[ServerProcess]) -> None:
        """The pod's init container, to completion (it waits for what the main container needs)."""
        try:
            done = subprocess.run(self.command(workload, ports, init=True), capture_output=True, text=True,
                                  timeout=180)
        except subprocess.TimeoutExpired as exc:
            done = subprocess.CompletedProcess(exc.cmd, "timed out", exc.stdout or "", exc.stderr or "")
        logs = "".join(p.log()[-3000:] for p in processes)
        assert done.returncode == 0, f"{workload}'s init container: {done.stdout[-500:]}{done.stderr[-2000:]}{logs}"


def key_works(url: str, key: str) -> bool:
    answer = httpx.get(url + "/v1/info", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert answer.status_code in (200, 401), answer.text
    return answer.status_code == 200


@pytest.mark.e2e
def test_cpu_overlay_runs_as_processes_and_teachers_reload_the_team_secret(assets):  # noqa: F811 (the fixture)
    """One teacher process (teacher-strong serves both domains, so teacher-math's and teacher-code's Services point at
    it here), the rollout server, Redis and two training steps; then the team-file Secret is updated as the kubelet
    updates it and the running teacher takes the new keys without a restart."""
    k8s = Manifests("cpu")
    ports = {"teacher-strong": free_port(), "rollout": free_port()}
    with lru_redis(k8s.argv(k8s.container("redis"))) as redis_url:
        local = {**dict.fromkeys(TEACHERS, ports["teacher-strong"]), "rollout": ports["rollout"],
                 "redis": urlsplit(redis_url).port}
        hosts = {f"{name}:{service['spec']['ports'][0]['port']}": f"127.0.0.1:{local[name]}"
                 for name, service in k8s.named("Service").items()}
        node = Node(k8s, assets, {"uniopd-assets": assets / "models", "uniopd-runs": assets / "runs"}, hosts)
        servers: list[ServerProcess] = []
        try:
            for name in ("teacher-strong", "rollout"):
                node.init(name, ports, servers)
                servers.append(spawn(node.command(name, ports), node.env(name), assets / f"{name}.log", ports[name]))
            node.init("trainer", ports, servers)  # waits for both servers' /readyz, Redis and the data files
            teacher = servers[0].url
            key = node.env("trainer")["UNIOPD_TEACHER_API_KEY"]
            assert key_works(teacher, key) and not key_works(teacher, "wrong-key")

            train = node.command("trainer", ports) + shlex.split(ENV["UNIOPD_TRAIN_ARGS"])  # 2 small steps
            done = subprocess.run(train, capture_output=True, text=True, timeout=300, env=node.env("trainer"))
            assert done.returncode == 0, done.stderr[-4000:]
            rows = read_log(assets / "runs" / "k8s" / "metrics.jsonl")
            assert [r["step"] for r in rows] == [1, 2]
            assert all(r["masked_samples"] == 0 and r["domain/math/scored"] + r["domain/code/scored"] == 8
                       for r in rows)
            assert (assets / "runs" / "k8s" / "checkpoints" / "step-000002").is_dir()

            project(assets / "volumes" / "uniopd-teams", {"teams.yaml": "teams:\n  rotated: {keys: [new-key]}\n"})
            deadline = time.monotonic() + 10
            while key_works(teacher, key) or not key_works(teacher, "new-key"):
                assert time.monotonic() < deadline, "the teacher did not reload the updated Secret"
                time.sleep(0.3)
            assert servers[0].proc.poll() is None
        finally:
            for server in servers:
                server.stop()
