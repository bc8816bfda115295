"""Whether the configured Prefect API answers."""

from __future__ import annotations

from eightgen.errors import EightgenError


def check_api(required: bool = True, timeout: float = 5.0) -> str | None:
    """The URL of the configured Prefect API once it answers; None if none is set and none is `required`."""
    import httpx
    from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL

    url, key = PREFECT_API_URL.value(), PREFECT_API_KEY.value()
    if not url and not required:
        return None  # the embedded (ephemeral) API
    if not url:
        raise EightgenError(
            "serving needs a Prefect server: start one with `prefect server start` "
            "and set PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    try:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        answer = httpx.get(f"{url.rstrip('/')}/health", headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise EightgenError(f"no Prefect API reachable at {url} ({type(exc).__name__}); is `prefect server start` running?") from None
    if answer.status_code != 200:
        raise EightgenError(f"the Prefect API at {url} answered HTTP {answer.status_code} to a health check")
    return url
