"""Where big request media goes: an object store that hands out pre-signed GET URLs.

The model fetches each upload by URL, so the store needs only two things: put a local file
under a key, and sign a time-limited GET URL for that key that works without credentials.
`ObjectStore` is that contract; `S3Store` implements it with boto3.

Why only S3 here: boto3 is the one object-store SDK this project depends on, and the S3
protocol also reaches Cloudflare R2, MinIO, Backblaze B2 and Google Cloud Storage's XML API
(with HMAC keys, endpoint `https://storage.googleapis.com`) through `endpoint_url`. Native
GCS (`Blob.upload_from_filename` + `Blob.generate_signed_url(version="v4")`) or Azure Blob
(`BlobClient.upload_blob` + `generate_blob_sas`) stores plug in behind the same Protocol in
a few lines each; they are not included because their SDKs are not installed here and
untested code is worse than none.

Two things every store shares, which callers must know:
- A pre-signed URL is a bearer credential for one object until it expires. It is never
  logged here (only bucket and key are), and callers must not log it either.
- A URL signed with temporary credentials (STS, SSO, an instance or task role) stops
  working when those credentials expire, whatever its own expiry says. Sign with long-lived
  credentials when the model may fetch the URL hours later (async requests).
Uploads are not deleted here: the model may fetch them long after the request is sent.
Give the bucket a lifecycle rule that expires objects under `prefix` after a day or two.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_PREFIX = "truss-llm-uploads/"
# S3 allows at most 10,000 parts an object, so 16 MiB parts reach 160 GiB. Files under the
# threshold go up in one PUT: below ~16 MiB a multipart upload's three extra round trips cost
# more than parallel parts save.
MULTIPART_THRESHOLD_BYTES = 16 * MiB
MULTIPART_CHUNK_BYTES = 16 * MiB
# Parts in flight at once; memory held by the transfer is about this times the chunk size.
MAX_CONCURRENCY = 4
# SigV4 pre-signed URLs are valid for at most 7 days.
S3_PRESIGN_MAX_EXPIRY_S = 7 * 24 * 3600


# botocore logs each SigV4 computation at DEBUG: canonical request (which carries a session
# token when there is one), string to sign, signature. For a pre-signed URL the signature is
# the secret, so these records are dropped while this module signs, on that thread only.
SIGNING_LOGGER = "botocore.auth"
SIGNING_RECORD_PREFIXES = ("CanonicalRequest:", "StringToSign:", "Signature:")
_signing = threading.local()


class _DropPresignRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(_signing, "active", False) and isinstance(record.msg, str)
                    and record.msg.startswith(SIGNING_RECORD_PREFIXES))


_SIGNING_FILTER = _DropPresignRecords()


@contextmanager
def _quiet_signing() -> Iterator[None]:
    signing_logger = logging.getLogger(SIGNING_LOGGER)
    if _SIGNING_FILTER not in signing_logger.filters:
        signing_logger.addFilter(_SIGNING_FILTER)
    _signing.active = True
    try:
        yield
    finally:
        _signing.active = False


class ObjectStore(Protocol):
    """What the uploader needs from an object store."""

    def upload(self, path: Path, key: str, content_type: str | None) -> None:
        """Store the file at `path` under `key` (relative to the store's own prefix)."""
        ...

    def presigned_get_url(self, key: str, expires_in_s: int) -> str:
        """A URL that GETs `key` without credentials for `expires_in_s` seconds.

        Must be computable locally, before or after the upload: the uploader signs once to
        size the request and again after all uploads, so the expiry runs from then.
        """
        ...

    def location(self, key: str) -> str:
        """Where `key` lives, for logs and reports (e.g. `s3://bucket/prefix/key`); no secrets."""
        ...


class S3Store:
    """An S3 (or S3-compatible) bucket; multipart uploads for big files, SigV4 signed URLs.

    `client` is a ready boto3 S3 client; without one, a client is made from the default
    credential chain with `endpoint_url` and `region`. `region` must be the bucket's: a
    SigV4 URL is signed for one region and S3 refuses it from any other. `show_progress`
    None shows a progress bar only when stderr is a terminal.
    """

    def __init__(self, bucket: str, client: Any = None, endpoint_url: str | None = None,
                 region: str | None = None, prefix: str = DEFAULT_PREFIX, *,
                 multipart_threshold_bytes: int = MULTIPART_THRESHOLD_BYTES,
                 multipart_chunk_bytes: int = MULTIPART_CHUNK_BYTES,
                 max_concurrency: int = MAX_CONCURRENCY,
                 show_progress: bool | None = None) -> None:
        from boto3.s3.transfer import TransferConfig

        if not bucket:
            raise ValueError("an S3 bucket name is required")
        self.bucket = bucket
        self.prefix = prefix
        self.client = client if client is not None else make_s3_client(endpoint_url, region)
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold_bytes,
            multipart_chunksize=multipart_chunk_bytes,
            max_concurrency=max_concurrency)
        self.show_progress = show_progress

    def object_key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.object_key(key)}"

    def upload(self, path: Path, key: str, content_type: str | None) -> None:
        size = path.stat().st_size
        extra = {"ContentType": content_type} if content_type else None
        # disable=None is tqdm's "only on a terminal"; the callback runs on transfer threads,
        # which tqdm's update tolerates.
        disable = None if self.show_progress is None else not self.show_progress
        with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"upload {Path(key).name}", disable=disable, leave=False) as bar:
            self.client.upload_file(str(path), self.bucket, self.object_key(key),
                                    ExtraArgs=extra, Config=self.transfer_config,
                                    Callback=bar.update)
        logger.debug("uploaded %d bytes to %s", size, self.location(key))

    def presigned_get_url(self, key: str, expires_in_s: int) -> str:
        if not 1 <= expires_in_s <= S3_PRESIGN_MAX_EXPIRY_S:
            raise ValueError(f"S3 pre-signed URLs last 1 s to 7 days "
                             f"({S3_PRESIGN_MAX_EXPIRY_S} s), not {expires_in_s} s")
        with _quiet_signing():
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self.object_key(key)},
                ExpiresIn=expires_in_s)


def make_s3_client(endpoint_url: str | None = None, region: str | None = None) -> Any:
    """A boto3 S3 client that signs with SigV4, path-style on a custom endpoint.

    SigV4 because SigV2 is deprecated and its URLs would not obey the 7-day bound; path
    style on custom endpoints because MinIO, moto and most S3-compatible servers do not
    resolve `<bucket>.<host>` names.
    """
    import boto3
    from botocore.config import Config

    config = Config(signature_version="s3v4",
                    s3={"addressing_style": "path" if endpoint_url else "auto"})
    return boto3.session.Session(region_name=region).client(
        "s3", endpoint_url=endpoint_url, config=config)
