"""Request paths as the inbound sidecar authorizes them, normalized (no I/O): shared by the
sidecar (``proxy.headers.normalize_target``), the policy reader (a policy path the sidecar could
never see is refused) and ``sidemesh authz check``."""

from __future__ import annotations

import re

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(rb"%(..)?")
_HEX = frozenset(b"0123456789abcdefABCDEF")


class BadPath(ValueError):
    """A request target that cannot be normalized (bad percent-encoding). Spaces and control
    characters never get here: the parser refuses them."""


def _decode_unreserved(match: re.Match[bytes]) -> bytes:
    pair = match.group(1)
    if pair is None or pair[0] not in _HEX or pair[1] not in _HEX:
        raise BadPath("invalid percent-encoding")
    char = int(pair, 16)
    return bytes([char]) if char in _UNRESERVED else b"%" + pair.upper()


def remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 section 5.2.4, for an absolute path."""
    out: list[bytes] = []
    segments = path.split(b"/")[1:]
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == b"..":
            if out:
                out.pop()
            if last:
                out.append(b"")
        elif segment == b".":
            if last:
                out.append(b"")
        else:
            out.append(segment)
    return b"/" + b"/".join(out)


def normalize_path(path: bytes) -> bytes:
    """``path`` (no query) as Istio's default (``BASE``) normalizes it with Envoy's
    ``normalize_path``: backslashes become slashes, percent-encoded unreserved characters are
    decoded (and the others' hex upper-cased, RFC 3986 section 6.2.2), then ``.`` and ``..``
    segments are removed (section 5.2.4). Raises :class:`BadPath`."""
    path = path.replace(b"\\", b"/")
    if b"%" in path:
        path = _PCT.sub(_decode_unreserved, path)
    if b"/." in path:  # a dot segment always follows a slash
        path = remove_dot_segments(path)
    return path
