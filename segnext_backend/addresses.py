"""Which IP addresses count as public, by an explicit table rather than by the interpreter's `ipaddress`.

`ipaddress.ip_address(a).is_global` follows whatever IANA registry the running Python shipped with: Python
3.11.7 calls 192.0.0.8 global, later releases do not. The image fetcher's rule must not move with the
interpreter, so the ranges are listed here, from IANA's IPv4 and IPv6 Special-Purpose Address Registries
(and the IPv6 Address Space registry), and tested directly.

The rule: an address is public when it is in no range below. That refuses every special-purpose block whose
"Globally Reachable" is not "True" in the registries. It is stricter than IANA in two places, on purpose: the
few globally reachable anycast blocks inside non-global ones (192.0.0.9/32, 192.0.0.10/32, 2001:1::1-3,
2001:3::/32, ...) are refused with their enclosing block (no image host lives on a protocol anycast address),
and in IPv6 only global unicast (2000::/3) can be public at all. An IPv4-mapped IPv6 address (::ffff:a.b.c.d)
is judged as its IPv4 address.
"""

from __future__ import annotations

import ipaddress

NON_PUBLIC_IPV4 = tuple(
    ipaddress.ip_network(block)
    for block in (
        "0.0.0.0/8",  # "this network" (RFC 791)
        "10.0.0.0/8",  # private use (RFC 1918)
        "100.64.0.0/10",  # shared address space, carrier-grade NAT (RFC 6598)
        "127.0.0.0/8",  # loopback (RFC 1122)
        "169.254.0.0/16",  # link local, cloud metadata services (RFC 3927)
        "172.16.0.0/12",  # private use (RFC 1918)
        "192.0.0.0/24",  # IETF protocol assignments (RFC 6890), 192.0.0.8 among them
        "192.0.2.0/24",  # documentation TEST-NET-1 (RFC 5737)
        "192.88.99.0/24",  # deprecated 6to4 relay anycast (RFC 7526)
        "192.168.0.0/16",  # private use (RFC 1918)
        "198.18.0.0/15",  # benchmarking (RFC 2544)
        "198.51.100.0/24",  # documentation TEST-NET-2 (RFC 5737)
        "203.0.113.0/24",  # documentation TEST-NET-3 (RFC 5737)
        "224.0.0.0/4",  # multicast (RFC 5771): not an image host
        "240.0.0.0/4",  # reserved (RFC 1112), with 255.255.255.255 limited broadcast
    )
)

# In IPv6 only global unicast can be public; these special-purpose blocks inside it are not.
GLOBAL_UNICAST_IPV6 = ipaddress.ip_network("2000::/3")
NON_PUBLIC_IPV6 = tuple(
    ipaddress.ip_network(block)
    for block in (
        "2001::/23",  # IETF protocol assignments (RFC 2928), Teredo 2001::/32 among them
        "2001:db8::/32",  # documentation (RFC 3849)
        "2002::/16",  # 6to4 (RFC 3056): carries an IPv4 address of any kind
        "3fff::/20",  # documentation (RFC 9637)
        "5f00::/16",  # segment routing SIDs (RFC 9602)
    )
)


def is_public(address: str) -> bool:
    """Whether `address` (IPv4 or IPv6 text, an IPv6 %zone allowed) is outside every non-public range."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        else:
            return ip in GLOBAL_UNICAST_IPV6 and not any(ip in block for block in NON_PUBLIC_IPV6)
    return not any(ip in block for block in NON_PUBLIC_IPV4)
