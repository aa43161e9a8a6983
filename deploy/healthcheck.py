"""Container healthchecks for deploy/docker-compose.yml (exit 0 = healthy, 1 = unhealthy).

``python deploy/healthcheck.py http URL``
    Healthy when ``URL`` answers 2xx within the timeout (serving's API).

``python deploy/healthcheck.py group GROUP``
    Healthy when *this* container is a member of Kafka consumer group ``GROUP``: the group
    coordinator lists a member whose client host is one of this container's addresses. A learner
    that crashed out of its poll loop, or hangs so long the broker evicted it (session timeout),
    drops out of the group and turns unhealthy, even though its process may still be alive.

Uses the platform's own settings (``FEDSTREAM_*``) and Kafka client builders, so it checks the same
cluster the worker talks to. Prints one line saying why, which ``docker inspect`` shows.
"""

from __future__ import annotations

import socket
import sys
import urllib.request


def check_http(url: str, timeout_s: float = 4.0) -> tuple[bool, str]:
    """GET ``url``; healthy on a 2xx answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 200 <= response.status < 300, f"{url} answered {response.status}"
    except OSError as exc:  # URLError, HTTPError and timeouts are all OSErrors
        return False, f"{url} failed: {exc}"


def local_addresses() -> set[str]:
    """This container's IP addresses (its hostname resolves to them inside a compose network)."""
    addresses = {"127.0.0.1"}
    try:
        addresses.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return addresses


def group_members(group: str) -> tuple[str, list[str]]:
    """(state, member client hosts) of a consumer group, asked to its coordinator."""
    from fedstream.settings import load_settings
    from streams.kafka import make_admin

    admin = make_admin(load_settings())
    # kafka-python decodes the group's authorized-operations bitfield into its ACLOperation enum and
    # raises on bits it does not know (tansu sets some); membership is all we need, so keep it raw.
    admin._process_acl_operations = lambda group_dict: group_dict
    try:
        description = admin.describe_groups([group])[group]
    finally:
        admin.close()
    if description.get("error"):
        raise RuntimeError(description["error"])
    hosts = [str(member.get("client_host", "")).lstrip("/") for member in description.get("members") or []]
    return str(description.get("group_state", "")), hosts


def membership(hosts: list[str], addresses: set[str]) -> tuple[bool, str]:
    """Whether one of the group's member hosts is ours.

    Apache Kafka reports each member's client address. A broker that reports none (tansu leaves it
    empty) only lets us check that the group has members at all, and the answer says so.
    """
    if not hosts:
        return False, "members=0"
    if not any(hosts):
        return True, f"members={len(hosts)} (broker reports no client hosts: group-level check)"
    ours = sorted(addresses.intersection(hosts))
    return bool(ours), f"members={len(hosts)} ours={ours or 'none'}"


def check_group(group: str, addresses: set[str] | None = None) -> tuple[bool, str]:
    """Healthy when one of the group's members connects from one of ``addresses`` (default: ours)."""
    addresses = local_addresses() if addresses is None else addresses
    try:
        state, hosts = group_members(group)
    except Exception as exc:  # broker down, coordinator moving, unknown group: all unhealthy
        return False, f"group {group}: {type(exc).__name__}: {exc}"
    healthy, why = membership(hosts, addresses)
    return healthy, f"group {group} state={state} {why}"


def main(argv: list[str]) -> int:
    checks = {"http": check_http, "group": check_group}
    if len(argv) != 2 or argv[0] not in checks:
        print(__doc__.strip().splitlines()[0], "\nusage: healthcheck.py http URL | group GROUP", file=sys.stderr)
        return 2
    healthy, why = checks[argv[0]](argv[1])
    print(("healthy: " if healthy else "unhealthy: ") + why)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
