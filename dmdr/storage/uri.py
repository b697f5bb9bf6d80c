"""`s3://bucket/prefix` URIs: parse, join, render.

A parsed URI keeps the key without leading or trailing slashes, so joining is plain string work
and `str()` round-trips: `S3Uri.parse("s3://b/a/b/") == S3Uri("b", "a/b")`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from dmdr.errors import UserError

# S3 bucket naming rules (the subset every S3-compatible store accepts): 3-63 characters,
# lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def is_s3_uri(value: object) -> bool:
    """True when `value` is a string that starts with ``s3://``."""
    return isinstance(value, str) and value.startswith("s3://")


@dataclass(frozen=True)
class S3Uri:
    """A bucket and a key (or key prefix) inside it.

    Attributes:
        bucket: bucket name.
        key: object key or prefix, without leading/trailing slashes ("" for the bucket root).
    """

    bucket: str
    key: str = ""

    @classmethod
    def parse(cls, uri: str) -> "S3Uri":
        """Parse ``s3://bucket[/key]``; raise UserError naming the URI when it is malformed."""
        if not is_s3_uri(uri):
            raise UserError(
                f"'{uri}' is not an S3 URI: write it as s3://BUCKET/PREFIX (for example "
                "s3://my-bucket/dmdr-runs)."
            )
        rest = uri[len("s3://"):]
        bucket, _, key = rest.partition("/")
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise UserError(
                f"'{uri}' has an invalid bucket name '{bucket}': bucket names are 3-63 lowercase "
                "letters, digits, dots or hyphens; fix the s3:// URI."
            )
        key = key.strip("/")
        if "//" in key or any(part in (".", "..") for part in key.split("/") if key):
            raise UserError(
                f"'{uri}' has an empty, '.' or '..' path segment; write the prefix as "
                "s3://BUCKET/a/b without doubled slashes or dot segments."
            )
        return cls(bucket, key)

    def join(self, *parts: str) -> "S3Uri":
        """A URI below this one; each part may itself contain slashes."""
        segs = [self.key] if self.key else []
        for part in parts:
            part = part.strip("/")
            if part:
                segs.append(part)
        return S3Uri(self.bucket, "/".join(segs))

    @property
    def prefix(self) -> str:
        """The key as a listing prefix: ``"a/b/"``, or ``""`` at the bucket root."""
        return f"{self.key}/" if self.key else ""

    @property
    def name(self) -> str:
        """Last path segment of the key ("" at the bucket root)."""
        return self.key.rsplit("/", 1)[-1]

    def relative(self, key: str) -> str:
        """The part of `key` below this prefix (raises ValueError when it is not below)."""
        if not key.startswith(self.prefix):
            raise ValueError(f"{key!r} is not below {self}")
        return key[len(self.prefix):]

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"
