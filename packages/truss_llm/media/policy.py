"""Which URLs the media fetcher may touch, and how it talks about them.

Fetching a caller's URL from inside a GPU container is the classic SSRF hole: the container
can reach the cloud metadata service (169.254.169.254), the cluster's private network and
its own loopback services. So a URL is judged twice: its host must match an allow-list of
object-store patterns (S3, GCS, Azure Blob by default), and every address the host resolves
to must be a public unicast address, unless an operator listed its network explicitly. The
fetcher then dials exactly the address judged here, never a second DNS answer.

A pre-signed URL carries its credential in the query string, so nothing here ever logs or
raises with a query string: `redact_url` keeps scheme, host, port and path only.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from http import HTTPStatus
from typing import Annotated
from urllib.parse import urlsplit

import httpx
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MiB = 1024 * 1024
GiB = 1024 * MiB

DEFAULT_MAX_BYTES = 2 * GiB
# Caps on one media part of a chat request, fetched or inlined (model side; `max_bytes` is
# the fetcher's own ceiling for any use). OpenAI takes images up to 20 MB and audio files up
# to 25 MB; a video and a text document get room for a short clip and a long report, since
# a document is further bounded by what the model's context can hold.
DEFAULT_MAX_IMAGE_BYTES = 20 * MiB
DEFAULT_MAX_AUDIO_BYTES = 25 * MiB
DEFAULT_MAX_VIDEO_BYTES = 64 * MiB
DEFAULT_MAX_FILE_BYTES = 32 * MiB
# All parts of one request together, and all requests of a replica together (bytes of media
# held in memory at once; see media/memory.py).
DEFAULT_MAX_REQUEST_MEDIA_BYTES = 96 * MiB
DEFAULT_REPLICA_MEDIA_BUDGET_BYTES = 512 * MiB
DEFAULT_MAX_REDIRECTS = 5
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 30.0  # longest silence between two received bytes
DEFAULT_TOTAL_TIMEOUT_S = 600.0  # 2 GiB at ~4 MB/s; a request deadline usually ends sooner
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_BACKOFF_INITIAL_S = 0.5
DEFAULT_BACKOFF_MAX_S = 8.0

MAX_SHOWN_URL_CHARS = 256
UNPARSEABLE_URL = "<unparseable URL>"
DEFAULT_PORTS = {"http": 80, "https": 443}

# S3 in every spelling AWS documents, without admitting the rest of *.amazonaws.com (EC2
# public DNS names there resolve to private addresses from inside a VPC). fnmatch's `*`
# spans dots, so one pattern covers regional, dualstack, FIPS and access-point forms.
_S3_PATTERNS = tuple(
    pattern.format(domain=domain)
    for domain in ("amazonaws.com", "amazonaws.com.cn")
    for pattern in (
        "s3.{domain}",  # path-style, global endpoint
        "*.s3.{domain}",  # virtual-hosted, global endpoint
        "s3.*.{domain}",  # path-style regional and dualstack: s3.dualstack.us-east-1...
        "*.s3.*.{domain}",  # virtual-hosted regional and dualstack
        "s3-*.{domain}",  # legacy dash forms: s3-us-west-2, s3-external-1, s3-fips...
        "*.s3-*.{domain}",  # ...virtual-hosted, access points, object lambda
        "*.s3express-*.{domain}",  # S3 Express One Zone directory buckets
    )
)
_GCS_PATTERNS = ("storage.googleapis.com", "*.storage.googleapis.com")
_AZURE_BLOB_PATTERNS = ("*.blob.core.windows.net",)
DEFAULT_ALLOWED_HOSTS: tuple[str, ...] = _S3_PATTERNS + _GCS_PATTERNS + _AZURE_BLOB_PATTERNS

# Characters of a host that the C library's inet_aton may read as a number (127.1,
# 2130706433, 0x7f000001, 017700000001): such a host is an address, never a name.
_NUMERIC_HOST = re.compile(r"[0-9a-fx.]+")
# IPv6 prefixes that carry an IPv4 address in their low 32 bits (RFC 6052 NAT64).
_NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
# IANA's special-purpose ranges that are not globally reachable, listed here as well as
# judged by the ipaddress module, whose answers have changed between Python patch releases
# (192.0.0.8 is "global" on 3.11.7, multicast is "global" everywhere).
_NOT_PUBLIC = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
    "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/127", "::ffff:0:0/96", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32",
    "3fff::/20", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
))


class FetchError(Exception):
    """A fetch that did not produce the file, with what our server should answer.

    `status` is the HTTP status for OUR caller: final ones (400 refused or bad URL, 413 too
    large, 422 the upstream refused the request (404, 403), misbehaved or sent the wrong
    bytes) and retryable ones (502 the upstream kept failing (5xx, dropped or refused
    connections) through every attempt, 504 it timed out); `reason` is a short stable
    code. The message names host and path, never the query string.
    """

    REFUSED = "refused"
    TIMEOUT = "timeout"
    TOO_LARGE = "too_large"
    NOT_FOUND = "not_found"
    UPSTREAM_ERROR = "upstream_error"
    INTEGRITY = "integrity"

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = int(status)
        self.reason = reason
        self.message = message

    def __repr__(self) -> str:
        return f"FetchError({self.status}, {self.reason!r}, {self.message!r})"


def refused(message: str) -> FetchError:
    return FetchError(HTTPStatus.BAD_REQUEST, FetchError.REFUSED, message)


def _lowercase_patterns(patterns: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p.strip().lower().rstrip(".") for p in patterns if p.strip())


def _valid_networks(networks: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(str(ipaddress.ip_network(n.strip(), strict=False)) for n in networks)


def _readable_file(path: str | None) -> str | None:
    if path is not None and not os.access(path, os.R_OK):
        raise ValueError(f"ca_file {path!r} is not a readable file")
    return path


HostPatterns = Annotated[tuple[str, ...], AfterValidator(_lowercase_patterns)]
Networks = Annotated[tuple[str, ...], AfterValidator(_valid_networks)]


class FetchPolicy(BaseModel):
    """Where the fetcher may go and how long and how much it may take there."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    allow_http: bool = False
    allowed_hosts: HostPatterns = DEFAULT_ALLOWED_HOSTS
    extra_allowed_hosts: HostPatterns = ()
    # Networks whose addresses are accepted although not public, e.g. ("127.0.0.1/32",)
    # for a test server, or a VPC endpoint's subnet. They also admit IP-literal hosts.
    allowed_networks: Networks = ()
    max_bytes: int = Field(default=DEFAULT_MAX_BYTES, gt=0)
    max_redirects: int = Field(default=DEFAULT_MAX_REDIRECTS, ge=0)
    connect_timeout_s: float = Field(default=DEFAULT_CONNECT_TIMEOUT_S, gt=0)
    read_timeout_s: float = Field(default=DEFAULT_READ_TIMEOUT_S, gt=0)
    total_timeout_s: float = Field(default=DEFAULT_TOTAL_TIMEOUT_S, gt=0)
    max_attempts: int = Field(default=DEFAULT_MAX_ATTEMPTS, ge=1)
    backoff_initial_s: float = Field(default=DEFAULT_BACKOFF_INITIAL_S, ge=0)
    backoff_max_s: float = Field(default=DEFAULT_BACKOFF_MAX_S, ge=0)
    # sha256 of every fetched byte (FetchedFile.sha256). Off by default: it costs more CPU
    # than the download itself (0.85-0.97 s/GiB on one core here). A checksum to verify,
    # the caller's expected_sha256 or the store's header, turns hashing on regardless.
    hash_body: bool = False
    # A PEM bundle to verify servers against instead of the system's and certifi's CAs: an
    # S3-compatible store behind a private CA. The hostname is still checked.
    ca_file: Annotated[str | None, AfterValidator(_readable_file)] = None
    # Memory bounds of the chat path (parts.py, memory.py): per part by modality, per
    # request, and per replica (past the last one: 429 with Retry-After).
    max_image_bytes: int = Field(default=DEFAULT_MAX_IMAGE_BYTES, gt=0)
    max_audio_bytes: int = Field(default=DEFAULT_MAX_AUDIO_BYTES, gt=0)
    max_video_bytes: int = Field(default=DEFAULT_MAX_VIDEO_BYTES, gt=0)
    max_file_bytes: int = Field(default=DEFAULT_MAX_FILE_BYTES, gt=0)
    max_request_media_bytes: int = Field(default=DEFAULT_MAX_REQUEST_MEDIA_BYTES, gt=0)
    replica_media_budget_bytes: int = Field(default=DEFAULT_REPLICA_MEDIA_BUDGET_BYTES, gt=0)

    @model_validator(mode="after")
    def _request_fits_replica(self) -> FetchPolicy:
        # Otherwise a request under its own cap could be told to retry (429) forever.
        if self.max_request_media_bytes > self.replica_media_budget_bytes:
            raise ValueError(
                f"max_request_media_bytes ({self.max_request_media_bytes}) must not exceed "
                f"replica_media_budget_bytes ({self.replica_media_budget_bytes})")
        return self

    def max_part_bytes(self, modality: str) -> int:
        """The cap on one part of `modality` (image, audio, video, file)."""
        cap = getattr(self, f"max_{modality}_bytes")
        return min(cap, self.max_bytes, self.max_request_media_bytes)

    @property
    def host_patterns(self) -> tuple[str, ...]:
        return self.allowed_hosts + self.extra_allowed_hosts

    @property
    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(n) for n in self.allowed_networks)


@dataclass(frozen=True)
class Target:
    """One hop's URL, judged by scheme and host; `ip` is set when the host is an address."""

    url: httpx.URL
    host: str  # lowercase ASCII (IDNA), no trailing dot: what patterns are matched against
    port: int
    ip: str | None  # canonical address of an IP-literal host, dialled without any DNS

    @property
    def shown(self) -> str:
        return redact_url(str(self.url))


def redact_url(url: str) -> str:
    """`scheme://host[:port]/path` of a URL: never its query, fragment or user info."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
        port = parts.port
    except ValueError:
        return UNPARSEABLE_URL
    if not parts.scheme or not host:
        return UNPARSEABLE_URL
    if ":" in host:
        host = f"[{host}]"
    shown = f"{parts.scheme.lower()}://{host}{f':{port}' if port else ''}{parts.path}"
    if len(shown) > MAX_SHOWN_URL_CHARS:
        shown = shown[: MAX_SHOWN_URL_CHARS - 3] + "..."
    return shown


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a host spells, in any form the C resolver would accept, else None.

    Besides dotted quads and IPv6, inet_aton reads 127.1, 2130706433, 0x7f000001 and
    017700000001 as 127.0.0.1; treating those as names would let them reach a resolver
    (or a pattern) as if they were harmless hostnames.
    """
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_HOST.fullmatch(host.lower()) and any(c.isdigit() for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, compatible, 6to4, NAT64)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    compatible = address.packed[:12] == bytes(12) and int(address) > 1  # ::a.b.c.d, not ::1
    if compatible or address in _NAT64_PREFIX:
        return ipaddress.IPv4Address(address.packed[12:])
    return None


def _judged(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address):
        return embedded_ipv4(address) or address
    return address


def _is_public(address: IPAddress) -> bool:
    # is_global alone is not enough on Python 3.11: it calls multicast, fec0::/10 site-local
    # and ::a.b.c.d global. Each exclusion is spelled out.
    if (address.is_private or address.is_loopback or address.is_link_local
            or address.is_multicast or address.is_reserved or address.is_unspecified):
        return False
    if isinstance(address, ipaddress.IPv6Address) and (address.is_site_local or address.scope_id):
        return False
    if any(address.version == net.version and address in net for net in _NOT_PUBLIC):
        return False
    return address.is_global


def _in_networks(address: IPAddress, policy: FetchPolicy) -> bool:
    return any(address.version == net.version and address in net for net in policy.networks)


def dial_address(ip: str) -> str:
    """The address to connect to for a checked `ip`: IPv4-mapped IPv6 is dialled as IPv4."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def check_address(ip: str, policy: FetchPolicy) -> None:
    """Refuse (400) an address that is not public unicast, unless policy lists its network.

    Loopback, RFC 1918, link-local (the 169.254.169.254 metadata service), CGNAT
    100.64/10, unspecified, multicast, reserved, IPv6 ULA/link-local/site-local are all
    refused; an IPv6 address embedding an IPv4 one is judged by the IPv4 address.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        raise refused(f"not an IP address: {ip[:64]!r}") from None
    judged = _judged(address)
    if _in_networks(address, policy) or _in_networks(judged, policy):
        return
    if not _is_public(judged):
        raise refused(f"address {address} is not public ({_describe(judged)}) and its "
                      f"network is not in allowed_networks")


def _describe(address: IPAddress) -> str:
    for attribute in ("loopback", "link_local", "multicast", "unspecified", "reserved",
                      "private"):
        if getattr(address, f"is_{attribute}"):
            return attribute.replace("_", "-")
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "site-local"
    return "not globally routable"


def host_allowed(host: str, policy: FetchPolicy) -> bool:
    """Does `host` (as written, or as the address it spells) match an allowed pattern?

    A hostname must match a pattern; an IP-literal host must match a pattern or lie in
    `allowed_networks`. Its address is judged separately by `check_address`.
    """
    host = host.lower().strip("[]").rstrip(".")
    spellings = {host}
    address = parse_ip_literal(host)
    if address is not None:
        spellings.add(str(address))
        if _in_networks(address, policy) or _in_networks(_judged(address), policy):
            return True
    return any(fnmatch.fnmatchcase(spelling, pattern)
               for spelling in spellings for pattern in policy.host_patterns)


def check_url(url: str | httpx.URL, policy: FetchPolicy) -> Target:
    """Parse `url` and refuse (400) a scheme, user info or host the policy does not allow."""
    shown = redact_url(str(url))
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url.strip())
        host = parsed.raw_host.decode("ascii").lower().rstrip(".")
    except (httpx.InvalidURL, UnicodeError, TypeError, ValueError):
        raise refused(f"invalid URL {shown}") from None
    schemes = ("https", "http") if policy.allow_http else ("https",)
    if parsed.scheme not in schemes:
        raise refused(f"{shown}: scheme {parsed.scheme or '(none)'!r} is not allowed "
                      f"(allowed: {', '.join(schemes)})")
    if not host:
        raise refused(f"{shown}: the URL has no host")
    if parsed.userinfo:
        raise refused(f"{shown}: URLs with user info are not accepted")
    if not host_allowed(host, policy):
        raise refused(f"{shown}: host {host!r} is not in the allowed hosts")
    address = parse_ip_literal(host)
    port = parsed.port or DEFAULT_PORTS[parsed.scheme]
    return Target(url=parsed, host=host, port=port,
                  ip=str(address) if address is not None else None)
