"""Who can reach this server: whether the flags expose it beyond this machine, and without a login.

Used by the app process for the warning in the log and by the UI for its banner. Standard library only.
"""
from __future__ import annotations

import ipaddress


def is_loopback_name(name: str | None) -> bool:
    """True for a bind address or host name that only this machine can reach (None: the default 127.0.0.1)."""
    if not name:
        return True
    name = name.strip().strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def exposure_reasons(args) -> list[str]:
    """The flags that make the server reachable from other machines ([] when it listens on loopback only)."""
    reasons = []
    if args.server_name:
        if not is_loopback_name(args.server_name):
            reasons.append(f"--server-name {args.server_name}")
    elif args.listen:
        reasons.append("--listen")
    if args.share and not args.nowebui:
        reasons.append("--share")
    return reasons


def exposure_warnings(args) -> list[str]:
    """One message per part (web UI, API) that others can reach without a login; [] when none can."""
    reasons = exposure_reasons(args)
    if not reasons:
        return []
    how = " and ".join(reasons)
    warnings = []
    if not args.nowebui and not (args.gradio_auth or args.gradio_auth_path):
        warnings.append(
            f"The web UI is reachable from other machines ({how}) without a login: anyone who reaches it can generate "
            f"images, change settings and see your outputs. Set logins with --gradio-auth user:password "
            f"(or --gradio-auth-path FILE).")
    if (args.api or args.nowebui) and not args.api_auth:
        warnings.append(
            f"The API (/sdapi/v1) is reachable from other machines ({how}) without a login: anyone who reaches it can "
            f"use it, including changing settings. Set logins with --api-auth user:password.")
    return warnings
