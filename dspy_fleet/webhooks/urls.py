"""Where a callback may be sent: the SSRF guard of the API (at submission) and the worker
(at delivery, after resolving the name).

A callback URL is a request the fleet makes on a tenant's behalf from inside its network,
so by default it may only reach public addresses: no loopback, private (RFC 1918, ULA),
link-local, shared (CGNAT), unspecified, multicast, reserved or cloud metadata addresses
(169.254.169.254, fd00:ec2::254, ...), and only http or https. An operator allow-list
(DSPY_FLEET_CALLBACK_ALLOW: CIDRs and host names, comma-separated) lets chosen ones through.

The API checks the URL's form and, for an IP literal or a known internal name, its
address; it resolves no names (a name can resolve elsewhere by delivery time, and a DNS
lookup must not hold a request). The worker resolves the name when it delivers, checks
every address it got, and connects to a checked address itself (no second lookup for the
HTTP client to be tricked by: DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from dspy_fleet.contract import check_callback_form
from dspy_fleet.errors import CallbackUrlRefusedError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud metadata services (AWS v4 and v6, Alibaba, Oracle's v4 is the AWS one): named so
# the refusal says what it is. All are also non-global addresses.
METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
# Names that mean "this host" or a metadata service whatever DNS says.
INTERNAL_NAMES = ("localhost", "metadata", "metadata.google.internal", "instance-data")

Resolver = Callable[[str, int], Iterable[IPAddress]]


@dataclass(frozen=True)
class AllowList:
    """The operator's exceptions to the guard: networks and host names (lower case)."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def parse(cls, text: str) -> AllowList:
        """``"10.0.0.0/8, 127.0.0.1, hooks.internal"`` → an AllowList; ValueError if a CIDR
        is malformed (settings validation names the variable)."""
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        for raw in text.split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if "/" in entry:
                    raise ValueError(f"{entry!r} is not a CIDR") from None
                hosts.add(entry.rstrip("."))
        return cls(tuple(networks), frozenset(hosts))

    def allows_host(self, host: str) -> bool:
        """The host name itself is allow-listed (then any address it resolves to passes)."""
        return host.lower().rstrip(".") in self.hosts

    def allows_address(self, address: IPAddress) -> bool:
        """The address is in an allow-listed network."""
        return any(address.version == net.version and address in net for net in self.networks)


def refusal(address: IPAddress) -> str | None:
    """Why the guard refuses ``address`` (a short phrase), or None when it is public."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if address in METADATA:
        return "a cloud metadata address"
    checks = (
        ("is_unspecified", "an unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_private", "a private address"),
        ("is_reserved", "a reserved address"),
    )
    for attr, why in checks:
        if getattr(address, attr):
            return why
    if not address.is_global:
        return "a non-public address"  # 100.64.0.0/10 (shared), 192.0.0.0/24, ...
    return None


def _refused(url: str, why: str, *, allowable: bool = True) -> CallbackUrlRefusedError:
    hint = " (an operator can allow it with DSPY_FLEET_CALLBACK_ALLOW)" if allowable else ""
    return CallbackUrlRefusedError(
        f"callback_url is refused: {why}{hint}",
        details={"errors": [{"field": "callback_url", "message": why}]},
    )


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def check_url(url: str, allow: AllowList) -> tuple[str, str, int]:
    """The API's check, without DNS: (scheme, host, port) of an acceptable URL, or
    CallbackUrlRefusedError (422) saying why not."""
    try:
        check_callback_form(url)
    except ValueError as exc:
        raise _refused(url, str(exc), allowable=False) from None
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if allow.allows_host(host):
        return parts.scheme, host, port
    address = _literal(host)
    if address is not None:
        why = refusal(address)
        if why is not None and not allow.allows_address(address):
            raise _refused(url, f"{host} is {why}")
    elif host.lower() in INTERNAL_NAMES or host.lower().endswith(".localhost"):
        raise _refused(url, f"{host} names this host or a metadata service")
    return parts.scheme, host, port


def system_resolver(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (IPv4 and IPv6), by the system's resolver."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def resolve_checked(
    url: str, allow: AllowList, resolver: Resolver = system_resolver
) -> tuple[str, str, int, list[IPAddress]]:
    """The worker's check: (scheme, host, port, addresses) where every address the host
    resolves to passes the guard; CallbackUrlRefusedError if any does not (one bad
    address refuses the URL: the client would pick among them), OSError if the name
    does not resolve."""
    scheme, host, port = check_url(url, allow)
    literal = _literal(host)
    addresses = [literal] if literal is not None else list(dict.fromkeys(resolver(host, port)))
    if not addresses:
        raise OSError(f"{host} resolved to no address")
    if not allow.allows_host(host):
        for address in addresses:
            why = refusal(address)
            if why is not None and not allow.allows_address(address):
                raise _refused(url, f"{host} resolves to {address}, {why}")
    return scheme, host, port, addresses
