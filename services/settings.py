"""Service settings: command-line flags override `CAI_<SERVICE>_*` environment variables, which
override a YAML config file, which overrides the defaults below."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from cai.engine import CritiqueOptions, JudgeOptions
from cai.errors import InvalidArgument

ServiceName = Literal["policy", "critique", "judge"]
SERVICES: tuple[ServiceName, ...] = ("policy", "critique", "judge")


class ServiceSettings(BaseSettings):
    """What every service has: network, backend, limits, security, Kafka transport and logging.
    The subclasses add what only one service uses (its stream stage's work, its constitution)."""

    model_config = SettingsConfigDict(extra="forbid", validate_default=True)

    host: str = Field("127.0.0.1", description="address to listen on; 0.0.0.0 in a container")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; 0 picks a free one")
    backend: str = Field(
        "transformers:default",
        description="transformers:PATH, tgi:URL, openai:URL or policy:ADDRESS (critique and judge)",
    )
    policy_token: SecretStr | None = Field(
        None, description="policy backend: bearer token for the policy service"
    )
    policy_tls_ca: Path | None = Field(
        None, description="policy backend: CA (PEM) of the policy service; enables TLS"
    )
    tokenizer: str | None = Field(None, description="local tokenizer folder for the tgi and openai backends")
    served_model: str | None = Field(
        None,
        description="openai backend: the model to name in requests (default: the server's base "
        "model, never an adapter; critique and judge on the policy's vLLM name the base model)",
    )
    device: str | None = Field(None, description="transformers backend: cpu, cuda, ... (default: best)")
    dtype: str = Field("auto", description="transformers backend: auto, float32, bfloat16 or float16")
    max_batch_size: int = Field(16, ge=1, description="transformers backend: rows per batch")
    max_batch_tokens: int = Field(8192, ge=64, description="transformers backend: prompt tokens per batch")
    batch_window_ms: float = Field(
        5.0, ge=0, description="transformers backend: how long a batch waits for more requests"
    )
    max_queue: int = Field(256, ge=1, description="rows waiting before RESOURCE_EXHAUSTED")
    max_prompt_tokens: int = Field(2048, ge=1, description="longest accepted prompt, in tokens")
    max_new_tokens: int = Field(512, ge=1, description="largest accepted max_new_tokens")
    max_n: int = Field(8, ge=1, description="most completions per Generate and responses per Rank")
    max_rounds: int = Field(4, ge=1, description="most critique/revision rounds per call")
    max_batch: int = Field(64, ge=1, description="most comparisons per CompareBatch")
    max_concurrent_rpcs: int = Field(
        512, ge=1, description="calls served at once (health checks included); more get RESOURCE_EXHAUSTED"
    )
    max_message_bytes: int = Field(4 << 20, ge=1024, description="largest request or response message")
    token: SecretStr | None = Field(None, description="bearer token for every RPC; unset: no auth")
    read_token: SecretStr | None = Field(None, description="bearer token for read-only RPCs only")
    tls_cert: Path | None = Field(None, description="server certificate (PEM); enables TLS")
    tls_key: Path | None = Field(None, description="server private key (PEM)")
    tls_client_ca: Path | None = Field(None, description="CA (PEM) that client certificates must chain to")
    kafka: str | None = Field(None, description="Kafka bootstrap HOST:PORT: also run the stream stage")
    kafka_group: str | None = Field(
        None, description="consumer group of the stream stage (default: PREFIXcai-SERVICE)"
    )
    kafka_prefix: str = Field(
        "", description="prefix of the topic names, to run several pipelines on one cluster"
    )
    kafka_max_in_flight: int = Field(
        8, ge=1, description="records per partition processed at once (as many more are held waiting)"
    )
    kafka_max_attempts: int = Field(
        3,
        ge=1,
        description="tries of a record that keeps failing before it goes to the dead-letter topic "
        "(an unavailable or busy backend is retried until it answers)",
    )
    kafka_commit_interval_s: float = Field(
        0.5, gt=0, description="seconds between offset commits (a crash replays up to this much work)"
    )
    drain_s: float = Field(
        5.0,
        ge=0,
        description="seconds the service reports NOT_SERVING on SIGTERM while it still answers calls, "
        "so load balancers move away before it stops taking them",
    )
    grace_s: float = Field(
        30.0, ge=0, description="seconds in-flight calls get to finish on SIGTERM, after drain_s"
    )
    health_interval_s: float = Field(
        2.0,
        gt=0,
        description="seconds between checks that the backend can answer; the health status follows",
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")

    # Set by `load_settings`: the YAML file, read after the flags and the environment.
    config_file: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _YamlSource(settings_cls, cls.config_file)


class _YamlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], path: Path | None):
        super().__init__(settings_cls)
        self.values: dict[str, Any] = {}
        if path is None:
            return
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise InvalidArgument(f"--config: cannot read {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise InvalidArgument(f"--config: {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidArgument(f"--config: {path} must be a mapping of setting names to values")
        self.values = {str(k).replace("-", "_"): v for k, v in data.items()}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self.values


class PolicySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CAI_POLICY_", extra="forbid")
    port: int = Field(50051, ge=0, le=65535)
    metrics_port: int = Field(9091, ge=0, le=65535)
    follow_policy_versions: bool = Field(
        True,
        description="with kafka, load each version the trainer publishes on the policy-versions "
        "topic (transformers backend, or openai on vLLM with runtime LoRA updating)",
    )
    adapter_dir: Path | None = Field(
        None,
        description="where published policy versions are unpacked (default: a temporary folder); "
        "with the openai backend, a folder the vLLM server reads at the same path (a shared volume)",
    )
    loaded_versions: int = Field(
        3,
        ge=1,
        description="openai backend: policy versions kept loaded on vLLM, newest first, so requests "
        "started on an older one finish on it; the trainer's max_staleness + 1, at most vLLM's "
        "--max-loras",
    )
    responses_per_prompt: int = Field(2, ge=1, description="the stream stage's responses sampled per prompt")
    response_max_new_tokens: int = Field(
        96, ge=1, description="length limit of the stream stage's sampled responses"
    )


class _ConstitutionSettings(ServiceSettings):
    constitution: str = Field("default", description="constitution name or YAML file")


class CritiqueSettings(_ConstitutionSettings):
    model_config = SettingsConfigDict(env_prefix="CAI_CRITIQUE_", extra="forbid")
    port: int = Field(50052, ge=0, le=65535)
    metrics_port: int = Field(9092, ge=0, le=65535)
    rounds: int = Field(1, ge=1, description="the stream stage's critique/revision rounds per rollout")

    @property
    def critique_options(self) -> CritiqueOptions:
        return CritiqueOptions(rounds=self.rounds)


class JudgeSettings(_ConstitutionSettings):
    model_config = SettingsConfigDict(env_prefix="CAI_JUDGE_", extra="forbid")
    port: int = Field(50053, ge=0, le=65535)
    metrics_port: int = Field(9093, ge=0, le=65535)
    k_principles: int = Field(1, ge=1, description="the stream stage's comparison principles per label")
    judge_input: Literal["rollouts", "revisions"] = Field(
        "rollouts",
        description="the stream stage's input: rollouts (two sampled responses) or revisions "
        "(revision vs initial)",
    )
    debias: bool = Field(True, description="the stream stage judges both orderings of each pair")
    chain_of_thought: bool = Field(
        False, description="the stream stage reasons before the label (labels clamped to [0.4, 0.6])"
    )

    @property
    def judge_options(self) -> JudgeOptions:
        return JudgeOptions(k_principles=self.k_principles, debias=self.debias, cot=self.chain_of_thought)


SETTINGS: dict[str, type[ServiceSettings]] = {
    "policy": PolicySettings,
    "critique": CritiqueSettings,
    "judge": JudgeSettings,
}


def all_fields() -> dict[str, Any]:
    """Every setting of any service, by name (the `cai serve` flags)."""
    return {name: f for cls in SETTINGS.values() for name, f in cls.model_fields.items()}


def load_settings(service: ServiceName, config_file: Path | None = None, **flags: Any) -> ServiceSettings:
    """Settings for one service; flags that are None count as not given."""
    cls = type(SETTINGS[service].__name__, (SETTINGS[service],), {"config_file": config_file})
    try:
        return cls(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidArgument(f"{service} settings: {problems}") from None
