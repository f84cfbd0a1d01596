"""Process settings, read from `LORAFLEET_*` environment variables.

Secrets (a Redis password inside `redis_url`) come only from the environment and must never reach
a log line or a traceback: `Settings.__repr__` and `Settings.safe_dump()` redact them, and
`redacted()` is the one helper every caller uses before printing a URL.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lorafleet.common.ids import validate_id

ENV_PREFIX = "LORAFLEET_"
REDACTED = "***"
# Query parameters that redis-py and friends accept as credentials.
_SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pwd", "secret", "token", "sentinel_password"})


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "lorafleet"


class Settings(BaseSettings):
    """Every knob of every lorafleet process, in one object.

    Built once at process start (`Settings()` reads `LORAFLEET_<FIELD>`; the CLI passes its
    flags as keyword arguments, which win over the environment) and handed down explicitly: no
    library module reads the environment or builds its own settings.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # ---- every process -------------------------------------------------------------------
    # None: `lorafleet run` starts an embedded local Redis; every other command needs a URL.
    redis_url: str | None = None
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    # None: `file://<cache_dir>/store`, so one LORAFLEET_CACHE_DIR moves everything.
    store_url: str | None = None
    # Object stores: the S3 (-compatible) endpoint, else AWS_ENDPOINT_URL; extra fsspec storage
    # options as JSON (LORAFLEET_STORE_OPTIONS='{"key": ..., "secret": ...}'); credentials
    # otherwise come from the standard AWS chain (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...).
    store_endpoint_url: str | None = None
    store_options: dict[str, Any] = Field(default_factory=dict)
    base_model: str = "builtin:tiny-llama"
    device: str = "cpu"
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    log_format: Literal["auto", "json", "pretty"] = "auto"
    log_level: str = "INFO"
    max_spec_bytes: int = Field(default=65536, gt=0)
    max_dataset_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    max_dataset_rows: int = Field(default=10_000_000, gt=0)
    # None: under cache_dir, so DeepSpeed's JIT builds survive across runs without config.
    torch_extensions_dir: Path | None = None
    # Redis faults: every client has explicit timeouts (a hung Redis raises instead of blocking
    # forever); loops retry every Redis error class with capped exponential backoff.
    redis_socket_timeout_s: float = Field(default=10.0, gt=0)
    redis_connect_timeout_s: float = Field(default=5.0, gt=0)
    retry_backoff_max_s: float = Field(default=10.0, gt=0)  # cap of every retry backoff

    # ---- admission limits per experiment (a spec over one is refused at submit, naming it) ----
    max_rows_per_step: int = Field(default=1024, ge=1)  # prompts_per_step x group_size
    max_tokens_per_step: int = Field(default=1_048_576, ge=1)  # rows x max_new_tokens
    max_steps: int = Field(default=100_000, ge=1)
    max_lora_rank: int = Field(default=256, ge=1)
    # datasets: all files of one together (refused at submit by their listed size, without a read,
    # and at load), and their rows; a process's cached dataset indexes (rows are read by offset,
    # never a whole file), least recently used dropped over it
    max_dataset_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    max_dataset_rows: int = Field(default=10_000_000, gt=0)
    dataset_cache_bytes: int = Field(default=512 * 1024 * 1024, gt=0)
    # http(s) datasets (common/data/http_guard.py): loopback, private, link-local, multicast, reserved
    # addresses are refused unless this is set (test fleets on a private network); per request
    http_allow_private: bool = False
    http_connect_timeout_s: float = Field(default=10.0, gt=0)
    http_timeout_s: float = Field(default=300.0, gt=0)

    # ---- worker ----------------------------------------------------------------------------
    node: str = "node0"  # its queue is lf.node.<node>
    step_backend: Literal["torch", "deepspeed"] = "torch"
    rollout_engine: Literal["torch", "vllm"] | None = None  # None: vLLM on a GPU where installed
    max_resident: int = Field(default=64, ge=1)  # adapters kept hot (weights + AdamW state)
    lease_ms: int = Field(default=10_000, ge=100)
    heartbeat_s: float = Field(default=1.0, gt=0)
    torch_threads: int = Field(default=0, ge=0)  # 0: torch's default
    chain_train: bool = True  # train a node-routed rollout batch's step at once, on this worker
    # then keep claiming the batch's next rollout while nothing else waits, up to this long per
    # Celery task (0: the scheduler publishes every rollout)
    chain_rollouts_s: float = Field(default=30.0, ge=0)
    # an experiment's reward scoring per step: past it the step's attempt fails with the cause
    # (counted, as a reward that raises). Rewards that may be slow (a spec's regex, a plugin env or
    # reward) are scored in child processes, killed at the budget; co-tenants never wait for them
    score_budget_s: float = Field(default=10.0, gt=0)
    test_train_delay_s: float = Field(default=0.0, ge=0)  # fault injection: widens the step window
    test_snapshot_delay_s: float = Field(default=0.0, ge=0)  # fault injection: a snapshot's files
    # stay staged (written, not yet renamed into place) this long
    # fused train step memory: a mixed batch is split into micro-batches of at most this many
    # tokens (rows x padded length), gradients accumulated; logprobs are computed in chunks of
    # at most this many token positions (across rows), so only chunk x V logits exist at once
    train_tokens_per_microbatch: int = Field(default=16384, ge=1)
    logprob_chunk_tokens: int = Field(default=1024, ge=1)
    activation_checkpointing: bool | None = None  # None: on for cuda devices, off on cpu
    # multi-LoRA layers: grouped GEMMs (one kernel for all adapters) where the capability probe
    # passes on a GPU, else a loop over the adapters' row blocks (auto); or force one
    lora_backend: Literal["auto", "segment", "grouped"] = "auto"
    # checkpoints: every version has the adapter weights (what sampling needs); the AdamW state
    # is written every `snapshot_every_steps` versions or when `snapshot_every_s` have passed
    # since the adapter's last snapshot, and always at the last step. Recovery = last snapshot +
    # replay of the committed trajectories since (kept in Redis until the next snapshot)
    snapshot_every_steps: int = Field(default=10, ge=1)
    snapshot_every_s: float = Field(default=600.0, gt=0)
    # while a chained train step's versions are written, generate the next step of the same
    # experiments (torch engine; vLLM loads published versions): the write costs no idle time
    overlap_publish: bool = True
    # checkpoint retention (fleet defaults; a spec's `retention` overrides): keep the newest
    # `keep_last` committed versions (None: keep every version), v0 and every `keep_every`-th
    keep_last: int | None = Field(default=None, ge=1)
    keep_every: int = Field(default=0, ge=0)
    # infrastructure faults (store or Redis errors) pause and retry a batch, for at most this long
    # in all, without counting against any experiment's attempts
    infra_retry_s: float = Field(default=300.0, ge=0)
    store_sweep_s: float = Field(default=300.0, gt=0)  # how often orphaned temp dirs are removed
    # a temp dir this old is a dead writer's (a live one finishes a publish well within it)
    orphan_tmp_age_s: float = Field(default=600.0, gt=0)
    shutdown_grace_s: float = Field(default=30.0, gt=0)  # SIGTERM: finish or release the batch within

    # ---- vLLM rollout engine (None: derived from the worker's residency budget) -------------
    vllm_max_loras: int = Field(default=8, ge=1)
    vllm_max_lora_rank: int = Field(default=64, ge=1)
    vllm_max_cpu_loras: int | None = None
    vllm_kv_cache_bytes: int | None = None
    vllm_gpu_memory_utilization: float = Field(default=0.5, gt=0, le=1)
    vllm_canary_atol: float | None = None

    # ---- scheduler --------------------------------------------------------------------------
    # longest sleep between ticks: submits, commits and failures wake the loop at once; the
    # timer only paces the reaper and notices new workers
    tick_s: float = Field(default=0.25, gt=0)
    leader_ttl_ms: int = Field(default=3000, ge=100)
    max_batch_rows: int = Field(default=512, ge=1)  # sequences per fused batch
    unclaimed_timeout_s: float = Field(default=60.0, gt=0)  # published, never claimed: publish again
    max_attempts: int = Field(default=3, ge=1)  # poison cap per task
    # deliveries of one Celery message (each ended its worker process unacked) before the broker
    # transport dead-letters it instead of delivering it again (common/messaging/broker_transport.py)
    max_deliveries: int = Field(default=5, ge=1, le=1000)

    # ---- HTTP API (`lorafleet api`, scheduler/api/) -----------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    api_max_body_bytes: int = Field(default=64 * 1024 * 1024, gt=0)  # larger bodies: 413
    # a key's default limits (`lorafleet keys create` overrides them); work over a limit is
    # accepted and queued, never refused
    api_default_max_experiments: int = Field(default=16, ge=1)  # running at once, per key
    api_default_max_queued_ops: int = Field(default=256, ge=1)  # Tinker ops waiting, per key
    api_retrieve_hold_s: float = Field(default=25.0, gt=0)  # long-poll of retrieve_future (SDK: 45 s)
    # data an ordinary API key may name besides its uploads and its own experiments: URLs under
    # these comma-separated prefixes (e.g. "s3://team-bucket/datasets/"); common/data/access.py
    allowed_data_urls: str = ""
    # uploads (POST /v1/datasets) per API key: how many datasets and how many bytes in all
    max_datasets_per_key: int = Field(default=100, ge=1)
    max_dataset_bytes_per_key: int = Field(default=4 * 1024 * 1024 * 1024, ge=1)
    metrics_finished_ttl_s: float = Field(default=600.0, ge=0)  # finished experiments leave /metrics
    metrics_max_experiments: int = Field(default=500, ge=1)  # per-experiment series cap
    # the scrape credential of GET /metrics (Authorization: Bearer <token>); an admin API key is
    # accepted too. Neither: /metrics answers 401 (it is never open)
    metrics_token: str | None = Field(default=None, min_length=16)
    # per-experiment series (experiment ids and names as labels); off: fleet-wide series only
    metrics_per_experiment: bool = True

    # ---- client-driven models (the Tinker endpoint) ----------------------------------------
    tinker_base_model: str | None = None  # the name clients pass as base_model (None: base_model)
    # what get_info tells clients to load the tokenizer from: a hub id or a path that exists where
    # the clients run (None: the tokenizer directory of a worker, which only a client on the
    # same machine can read)
    tinker_tokenizer_id: str | None = None
    tinker_lora_alpha: float = Field(default=32.0, gt=0)
    tinker_max_sample_tokens: int = Field(default=256, ge=1)  # max_tokens when a client gives none
    tinker_session_ttl_s: float = Field(default=600.0, gt=0)  # no heartbeat this long: session over
    future_ttl_s: float = Field(default=3600.0, gt=0)  # a finished future's result is kept this long
    ops_linger_ms: int = Field(default=20, ge=0)  # wait this long for co-tenants' ops to fuse
    # client models are packed onto a node (to share its fused steps) up to this many
    client_models_per_node: int = Field(default=16, ge=1)
    max_sample_rows: int = Field(default=256, ge=1)  # sampled sequences per generation batch
    # after a commit, a worker waits this long for the same models' next ops and runs them in the
    # same task (no scheduler round trip), for at most chain_rollouts_s; 0: off
    client_chain_wait_ms: int = Field(default=50, ge=0)

    @field_validator("node")
    @classmethod
    def _node_id(cls, value: str) -> str:
        return validate_id(value, "node name")

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if not isinstance(logging.getLevelName(level), int):
            raise ValueError(f"unknown log level {value!r}")
        return level

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or "file://" + str(self.cache_dir / "store")

    @property
    def resolved_torch_extensions_dir(self) -> Path:
        if self.torch_extensions_dir is not None:
            return self.torch_extensions_dir
        return self.cache_dir / "torch_extensions"

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise ValueError("no Redis URL: set LORAFLEET_REDIS_URL or pass --redis-url")
        return self.redis_url

    def with_overrides(self, **fields: Any) -> Settings:
        """A validated copy with `fields` set (None values are ignored: flags left unset)."""
        given = {k: v for k, v in fields.items() if v is not None}
        return type(self).model_validate({**self.model_dump(), **given}) if given else self

    def safe_dump(self) -> dict[str, Any]:
        """`model_dump()` with secrets redacted: the only form that may be logged."""
        data = self.model_dump(mode="json")
        if data.get("redis_url"):
            data["redis_url"] = redacted(data["redis_url"])
        if data.get("store_url"):
            data["store_url"] = redacted(data["store_url"])
        data["store_options"] = {k: "***" for k in data.get("store_options") or {}}  # credentials
        if data.get("metrics_token"):
            data["metrics_token"] = "***"
        return data

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # pydantic builds both repr() and str() from these, so tracebacks and f-strings that show
        # a Settings object cannot leak the Redis password.
        for name, value in super().__repr_args__():
            if name in ("redis_url", "store_url") and isinstance(value, str):
                yield name, redacted(value)
            elif name == "store_options" and isinstance(value, dict):  # may hold credentials
                yield name, {k: "***" for k in value}
            elif name == "metrics_token" and value:
                yield name, "***"
            else:
                yield name, value


def redacted(url: str) -> str:
    """`url` with any password (in the userinfo or the query string) replaced by `***`."""
    if url.startswith("redis+sentinel://"):  # host:port,host:port: no single port to parse
        scheme_rest = url.split("://", 1)[1]
        netloc = scheme_rest.split("/", 1)[0]
        if "@" in netloc:
            userinfo, hosts = netloc.rsplit("@", 1)
            user = userinfo.split(":", 1)[0]
            safe = f"{user}:{REDACTED}@{hosts}" if ":" in userinfo else f"{user}@{hosts}"
            url = url.replace(netloc, safe, 1)
        parts = urlsplit(url)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, _redacted_query(parts.query),
                           parts.fragment))
    try:
        parts = urlsplit(url)
        password = parts.password
        host = parts.hostname
        port = parts.port
    except ValueError:
        # Unparseable: it might still hold a secret, so show nothing of it.
        return REDACTED
    netloc = parts.netloc
    if password is not None:
        userinfo = f"{parts.username or ''}:{REDACTED}"
        hostport = host or ""
        if ":" in hostport:  # IPv6 literal
            hostport = f"[{hostport}]"
        if port is not None:
            hostport = f"{hostport}:{port}"
        netloc = f"{userinfo}@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, _redacted_query(parts.query), parts.fragment))


def _redacted_query(query: str) -> str:
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key.lower() in _SECRET_QUERY_KEYS for key, _ in pairs):
            query = urlencode(
                [(k, REDACTED if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs],
                safe="*",
            )
    return query
