"""The optional alert hook: a JSON POST to a webhook URL (Slack-style incoming webhooks, a chat bridge, your own
endpoint). Nothing is sent when no URL is configured."""

from __future__ import annotations

import json
import urllib.request

TIMEOUT_S = 10.0


class AlertNotSent(RuntimeError):
    """The webhook did not accept the alert (unreachable, or a non-2xx answer)."""


def post_alert(url: str, payload: dict, timeout_s: float = TIMEOUT_S) -> int:
    """POST `payload` as JSON; return the HTTP status."""
    body = json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status
    except OSError as exc:  # URLError, HTTPError (a non-2xx answer) and timeouts are all OSErrors
        raise AlertNotSent(f"alert to {url} not sent: {exc}") from exc
