"""The review desk's settings (environment prefix ``ZALANDO_UI_``), read once where the page starts."""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_TOKEN_LENGTH = 16


class UiSettings(BaseSettings):
    """Where the page listens, the token it asks for, and the URLs it links to and is linked from."""

    model_config = SettingsConfigDict(env_prefix="ZALANDO_UI_", env_file=None, extra="ignore")

    host: str = Field(default="127.0.0.1", description="Address to bind; anything but loopback needs a token")
    port: int = Field(default=8765, ge=1, le=65535)
    token: SecretStr | None = Field(
        default=None,
        description=f"Access token (at least {MIN_TOKEN_LENGTH} characters): 'Authorization: Bearer' or the login form",
    )
    base_url: str | None = Field(
        default=None, description="Where the page is reached from elsewhere (Prefect artifacts, Label Studio)"
    )
    prefect_ui_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("ZALANDO_PREFECT_UI_URL", "PREFECT_UI_URL"),
        description="The Prefect UI, for links from a run to its flow run",
    )
    page_size: int = Field(default=50, ge=1, le=500, description="Review items per page")

    @field_validator("token", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        return v

    @field_validator("token")
    @classmethod
    def _long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < MIN_TOKEN_LENGTH:
            raise ValueError(f"ZALANDO_UI_TOKEN must be at least {MIN_TOKEN_LENGTH} characters")
        return v

    @field_validator("base_url", "prefect_ui_url")
    @classmethod
    def _strip_slash(cls, v: str | None) -> str | None:
        return v.strip().rstrip("/") or None if v else None
