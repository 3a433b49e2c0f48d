"""Dependencies shared by the routes: the app's state and the optional API key."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from service.errors import ServiceError
from service.settings import Settings
from service.state import ServiceState


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


def api_key_dependencies(settings: Settings) -> list[Any]:
    """``[Depends(check)]`` when an API key is configured (documented as a security scheme), else []."""
    if settings.api_key is None:
        return []
    header = settings.api_key_header
    scheme = APIKeyHeader(
        name=header, auto_error=False, description=f"the service's API key, in header {header}"
    )

    async def check_api_key(key: str | None = Security(scheme)) -> None:
        if not settings.api_key_ok(key.encode() if key is not None else None):
            raise ServiceError(
                401,
                "unauthorized",
                f"missing or wrong API key (send it in header {header})",
                headers={"WWW-Authenticate": "ApiKey"},
            )

    return [Depends(check_api_key)]
