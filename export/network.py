"""Is the weights host reachable at all? One quick probe instead of a minute of hub retries.

Offline, open_clip's download goes through huggingface_hub, which retries each file for about a
minute before it gives up. A TCP connection to the host (or to the HTTPS proxy in the
environment), bounded by a timeout that also covers the name lookup, answers the same question
in a few seconds at most; the answer is kept for the process.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0
_answers: Dict[Tuple[str, int], Tuple[bool, str]] = {}


def hub_endpoint() -> str:
    """The Hugging Face endpoint huggingface_hub talks to (HF_ENDPOINT, else its default)."""
    endpoint = os.environ.get("HF_ENDPOINT")
    if not endpoint:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    return endpoint


def _host_port(url: str) -> Tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"https://{url}")
    return parts.hostname or "", parts.port or (80 if parts.scheme == "http" else 443)


def endpoint_of(cfg: Dict[str, Any]) -> Tuple[str, int]:
    """(host, port) a download of open_clip's pretrained cfg `cfg` would connect to first."""
    if cfg.get("hf_hub"):
        return _host_port(hub_endpoint())
    return _host_port(cfg.get("url") or hub_endpoint())


def _proxy_for(port: int) -> Optional[str]:
    for key in (("HTTPS_PROXY", "https_proxy") if port != 80 else ("HTTP_PROXY", "http_proxy")):
        if os.environ.get(key):
            return os.environ[key]
    return None


def _resolve(host: str, port: int, timeout: float) -> list:
    """getaddrinfo with a deadline (a resolver without network can hang for much longer)."""
    result: Dict[str, Any] = {}

    def lookup() -> None:
        try:
            result["addrs"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            result["error"] = exc

    worker = threading.Thread(target=lookup, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"no answer to the name lookup of {host} within {timeout:g} s")
    if "error" in result:
        raise result["error"]
    return result["addrs"]


def reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> Tuple[bool, str]:
    """(True, "") when a TCP connection to `host:port` (or the proxy) opens within `timeout`; else (False, why)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False, "HF_HUB_OFFLINE is set"
    proxy = _proxy_for(port)
    target = _host_port(proxy) if proxy else (host, port)
    if target in _answers:
        return _answers[target]
    try:
        addrs = _resolve(target[0], target[1], timeout)
        family, kind, proto, _, address = addrs[0]
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(timeout)
            sock.connect(address)
        answer = (True, "")
    except (OSError, TimeoutError, IndexError) as exc:
        via = f" via proxy {target[0]}:{target[1]}" if proxy else ""
        answer = (False, f"{type(exc).__name__}: {exc}{via}")
    _answers[target] = answer
    return answer


def forget() -> None:
    """Drop the kept answers (tests)."""
    _answers.clear()


def offline_hint() -> str:
    return "pass --offline to skip this check and use only local weights"
