"""Who can reach the backend, and so Label Studio's images through its API key.

With LABEL_STUDIO_API_KEY set, a click makes the backend fetch the task's image from Label Studio with the key:
whoever can send a click gets a mask of any image Label Studio holds, private or not. Label Studio sends basic
auth credentials when its model connection has them; without them the backend must not be reachable beyond the
machine (or a network only Label Studio shares), and it refuses to start listening beyond loopback unless told
that this is meant (ALLOW_OPEN_ACCESS=true).
"""

from __future__ import annotations

import ipaddress

from .settings import Settings, SettingsError


def is_loopback(address: str) -> bool:
    """Whether a listening address (`127.0.0.1`, `[::1]:9090`, `localhost`, `unix:/path`) is reached from
    this machine only."""
    if address.startswith("unix:") or address.startswith("fd://"):
        return True
    host = address
    if host.startswith("["):  # [::1]:9090
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:  # 127.0.0.1:9090
        host = host.split(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: whatever it resolves to


def check_exposure(settings: Settings, addresses: list[str]) -> None:
    """Refuse to listen on `addresses` beyond loopback with an API key and no basic auth, unless allowed."""
    if settings.allow_open_access or not settings.label_studio_api_key or settings.basic_auth_user:
        return
    open_addresses = [address for address in addresses if not is_loopback(address)]
    if open_addresses:
        raise SettingsError(
            f"the backend would listen on {', '.join(open_addresses)} with LABEL_STUDIO_API_KEY set and no basic "
            "auth: anyone who reaches it could get masks of Label Studio's images. Set BASIC_AUTH_USER and "
            "BASIC_AUTH_PASS, and in Label Studio open the project's Settings > Model, edit the connection, turn "
            "on 'Use Basic Authentication' and enter the same user and password; or listen on loopback only "
            "(HOST=127.0.0.1); or, where only Label Studio can reach this port (a private network), set "
            "ALLOW_OPEN_ACCESS=true"
        )
