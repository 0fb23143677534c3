"""Server settings: command-line flags over BNSERVE_* environment variables over defaults.

Validated once at start, immutable afterwards, printed once (`Settings.summary()`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PORT = 8001
DEFAULT_METRICS_PORT = 8002
DEFAULT_GRACE_S = 10.0
# The drain closes the port once no call has been refused for this long (both front ends):
# gRPC's stop cancels the calls that have reached it but no handler yet.
DRAIN_QUIET_S = 0.1
MiB = 1024 * 1024


class Settings(BaseSettings):
    """Every knob of `bnserve serve`. Environment: BNSERVE_<FIELD>, e.g. BNSERVE_PORT=9001."""

    model_config = SettingsConfigDict(env_prefix="BNSERVE_", frozen=True, extra="forbid")

    repo: Path = Field(default=Path("model_repository"), description="model repository root")
    host: str = Field(default="0.0.0.0", description="gRPC bind address")
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535, description="gRPC port (0: any)")
    metrics_host: str | None = Field(default=None, description="metrics bind address (host)")
    metrics_port: int = Field(
        default=DEFAULT_METRICS_PORT, ge=-1, le=65535, description="Prometheus port; -1 disables"
    )
    poll: float | None = Field(
        default=None, gt=0, description="seconds between repository scans (hot reload); off"
    )
    grace: float = Field(
        default=DEFAULT_GRACE_S, ge=0, description="seconds in-flight requests get at shutdown"
    )
    lame_duck: float = Field(
        default=0.0,
        ge=0,
        description="seconds after the shutdown signal during which new calls still get "
        "UNAVAILABLE before the port closes (within --grace); 0: close once drained",
    )
    frontend: Literal["auto", "python", "native"] = Field(
        default="auto",
        description="who answers requests: the C++ front end (server/native_frontend.py: "
        "several times less CPU a request) or the Python one; auto: native when it is built "
        "and supports every setting asked for, else Python (one log line says why)",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="server processes sharing the port (SO_REUSEPORT); each loads every model",
    )
    reuse_port: bool = Field(
        default=False, description="bind with SO_REUSEPORT (set for --workers' processes)"
    )
    instances: int | None = Field(
        default=None, ge=1, description="onnxruntime sessions per model (default: CPU count)"
    )
    max_message_mb: int = Field(default=64, ge=1, le=2047, description="gRPC message size limit")
    log_level: str = Field(default="INFO")
    drift_sample_rate: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="fraction of batches scored for drift against the BN statistics; 0: off",
    )
    # Security (docs/security.md). Files are read and checked once at start (server/security.py).
    tls_cert: Path | None = Field(default=None, description="server certificate chain (PEM)")
    tls_key: Path | None = Field(default=None, description="server private key (PEM)")
    tls_client_ca: Path | None = Field(
        default=None, description="CA of client certificates: mutual TLS required"
    )
    auth_token_file: Path | None = Field(
        default=None, description="file holding the bearer token every call must carry"
    )
    auth_exempt_health: bool = Field(
        default=False, description="let grpc.health.v1.Health through without a token"
    )

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(f"log level must be DEBUG, INFO, WARNING or ERROR, got {v!r}")
        return v

    @model_validator(mode="after")
    def _lame_duck_within_grace(self) -> Settings:
        if self.lame_duck > 0 and self.lame_duck >= self.grace:
            raise ValueError(
                f"lame_duck ({self.lame_duck:g} s) must be shorter than grace ({self.grace:g} s): "
                "the port closes within the grace period, and the drain needs some of it"
            )
        return self

    @model_validator(mode="after")
    def _tls_pairs(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = (
                ("tls_cert", "tls_key") if self.tls_key is None else ("tls_key", "tls_cert")
            )
            raise ValueError(f"{given} needs {missing}: give the TLS certificate and key together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key as well")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * MiB

    @property
    def instances_per_model(self) -> int:
        return self.instances or os.cpu_count() or 1

    def summary(self) -> str:
        fields = self.model_dump()
        fields["instances"] = f"{self.instances_per_model}" + ("" if self.instances else " (cpus)")
        return " ".join(f"{k}={v}" for k, v in fields.items())
