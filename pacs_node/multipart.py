"""multipart/related encoding and a strict parser (RFC 2046) for STOW-RS bodies."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from pipeline.errors import IgtvError


class MultipartError(IgtvError):
    """The body is not a well-formed multipart message; the message says where."""


@dataclass(frozen=True)
class Part:
    """One body part: its headers (lower-case names) and content."""

    headers: dict[str, str]
    content: bytes

    @property
    def content_type(self) -> str:
        """The part's media type, lower case, without parameters ('' when absent)."""
        return self.headers.get("content-type", "").split(";")[0].strip().lower()


#: RFC 2046 boundary characters. RFC 2046 allows at most 70 of them, but Orthanc's DICOMweb
#: client sends 73, so up to 200 are accepted.
_BOUNDARY_RE = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,199}[0-9A-Za-z'()+_,\-./:=?]$")


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """Split ``type/subtype; a=b; c="d"`` into the lower-case media type and its parameters."""
    media, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for m in re.finditer(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)\s*;?', rest):
        key, val = m.group(1).lower(), m.group(2).strip()
        if val.startswith('"') and val.endswith('"') and len(val) >= 2:
            val = re.sub(r"\\(.)", r"\1", val[1:-1])
        params[key] = val
    return media.strip().lower(), params


def new_boundary() -> str:
    """A random boundary that cannot collide with DICOM content in practice."""
    return "igtv-" + secrets.token_hex(16)


def encode_related(parts: list[bytes], media_type: str = "application/dicom",
                   boundary: str | None = None) -> tuple[bytes, str]:
    """Build a multipart/related body; return (body, Content-Type header value)."""
    boundary = boundary or new_boundary()
    delim = f"--{boundary}".encode()
    chunks: list[bytes] = []
    for content in parts:
        if delim in content:  # practically impossible with a random boundary, but never emit a broken body
            return encode_related(parts, media_type)
        chunks += [delim, b"\r\nContent-Type: ", media_type.encode(), b"\r\n\r\n", content, b"\r\n"]
    chunks += [delim, b"--\r\n"]
    ctype = f'multipart/related; type="{media_type}"; boundary={boundary}'
    return b"".join(chunks), ctype


def parse_related(body: bytes, content_type: str, max_parts: int = 10000) -> tuple[str, list[Part]]:
    """Parse a multipart body; return (the ``type`` parameter, parts).

    Raises :class:`MultipartError` for a missing or invalid boundary, a missing
    first delimiter or close delimiter, malformed part headers, or too many parts.
    """
    media, params = parse_content_type(content_type)
    if not media.startswith("multipart/"):
        raise MultipartError(f"Content-Type {media!r} is not multipart")
    boundary = params.get("boundary")
    if not boundary:
        raise MultipartError("Content-Type has no boundary parameter")
    if not _BOUNDARY_RE.match(boundary):
        raise MultipartError(f"boundary {boundary[:80]!r} is invalid (1-200 characters of the RFC 2046 set)")
    delim = b"--" + boundary.encode("ascii")
    # The first delimiter may start the body or follow a preamble ending in CRLF.
    if body.startswith(delim):
        pos = len(delim)
    else:
        first = body.find(b"\r\n" + delim)
        if first < 0:
            raise MultipartError("body does not contain the boundary given in Content-Type")
        pos = first + 2 + len(delim)
    parts: list[Part] = []
    sep = b"\r\n" + delim
    while True:
        if body[pos:pos + 2] == b"--":
            break  # close delimiter
        # transport padding, then CRLF
        eol = body.find(b"\r\n", pos)
        if eol < 0 or body[pos:eol].strip(b" \t"):
            raise MultipartError(f"part {len(parts) + 1}: boundary line is not followed by CRLF")
        start = eol + 2
        end = body.find(sep, start)
        if end < 0:
            raise MultipartError(f"part {len(parts) + 1}: no closing boundary (body truncated?)")
        parts.append(_parse_part(body[start:end], len(parts) + 1))
        if len(parts) > max_parts:
            raise MultipartError(f"more than {max_parts} parts")
        pos = end + len(sep)
    if not parts:
        raise MultipartError("multipart body holds no parts")
    return params.get("type", "").lower(), parts


def _parse_part(raw: bytes, number: int) -> Part:
    if raw.startswith(b"\r\n"):
        return Part(headers={}, content=raw[2:])
    head_end = raw.find(b"\r\n\r\n")
    if head_end < 0:
        raise MultipartError(f"part {number}: headers are not terminated by an empty line")
    headers: dict[str, str] = {}
    for line in raw[:head_end].split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon or not name.strip():
            raise MultipartError(f"part {number}: malformed header line {line[:60]!r}")
        try:
            headers[name.decode("ascii").strip().lower()] = value.decode("latin-1").strip()
        except UnicodeDecodeError:
            raise MultipartError(f"part {number}: header name is not ASCII") from None
    return Part(headers=headers, content=raw[head_end + 4:])
