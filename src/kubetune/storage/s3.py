"""`S3Store`: the artifact store on `s3://bucket/prefix` (AWS S3, MinIO, Ceph, rclone …).

boto3 is imported here only, when a store is created, so the operator and `kubetune
validate` never load it. Transfers are multipart and parallel above a threshold (boto3's
transfer manager); path-style addressing and SigV4 work with every S3-compatible server.
Credentials come from the environment only (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN: the pod gets them from the Secret named by `credentialsSecretRef`),
never from files or instance metadata.

Failures are retried at three levels, each bounded (`kubetune.storage.s3_config` lists the
settings and their environment variables): botocore retries each request (connection
errors, timeouts, 500/502/503/504) with exponential backoff; the transfer manager re-reads
a ranged part whose body broke; and a whole object whose bytes arrive damaged is
transferred again. Each upload sends Content-MD5 (the server refuses a damaged body) and
records the sha256 as the object metadata `sha256`; downloads check size and sha256 before
the file gets its final name. After the budget, the error is a `TransferFailed` (reason
UploadFailed or DownloadFailed) naming the URI, the budget and what to do.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, cast

from kubetune.api.contract import Reason
from kubetune.storage.errors import (
    AccessDenied,
    InvalidKey,
    ObjectCorrupt,
    ObjectNotFound,
    StorageError,
    TransferFailed,
)
from kubetune.storage.s3_config import (
    S3Settings,
    client_config,
    damaged_in_transit,
    register_content_md5,
    settings_from_env,
)
from kubetune.storage.s3_errors import Direction, TranslatingReader, translate_error
from kubetune.storage.store import (
    CHUNK_SIZE,
    TEMP_MARKER,
    ObjectInfo,
    sha256_file,
    validate_key,
    validate_prefix,
)

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
SHA256_METADATA = "sha256"
"""User metadata key (x-amz-meta-sha256) holding the hex sha256 of the object."""


class S3Store:
    """A store under `s3://bucket/prefix`.

    Args:
        bucket: bucket name.
        prefix: key prefix of the store root ("" for the whole bucket).
        endpoint_url: S3 endpoint; default `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, or AWS.
        region: region; default `AWS_REGION`, `AWS_DEFAULT_REGION` or us-east-1.
        multipart_threshold: files larger than this go multipart (and download in ranges).
        multipart_chunksize: part size.
        max_concurrency: parts transferred in parallel.
        max_attempts: attempts per request, including the first; default
            `$AWS_MAX_ATTEMPTS` or 10.
        connect_timeout: seconds to wait for a connection; default
            `$KUBETUNE_S3_CONNECT_TIMEOUT` or 10.
        read_timeout: seconds to wait for data; default `$KUBETUNE_S3_READ_TIMEOUT` or 120.
        retry_mode: botocore's retry mode; default `$AWS_RETRY_MODE` or standard.
        transfer_attempts: reads of a downloaded part whose body breaks, and transfers of
            an object whose bytes arrive damaged; default `$KUBETUNE_S3_TRANSFER_ATTEMPTS`
            or 3.

    Raises:
        InvalidKey: the bucket or prefix is malformed.
        AccessDenied: the environment has no credentials.
        StorageError: a setting in the environment is malformed (InvalidSpec).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        *,
        multipart_threshold: int = 64 * MIB,
        multipart_chunksize: int = 64 * MIB,
        max_concurrency: int = 8,
        max_attempts: int | None = None,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        retry_mode: str | None = None,
        transfer_attempts: int | None = None,
    ) -> None:
        if not BUCKET_PATTERN.match(bucket):
            raise InvalidKey(
                f"invalid S3 bucket name {bucket!r} in s3://{bucket}/{prefix}: 3-63 lowercase "
                "letters, digits, dots and hyphens"
            )
        self.bucket = bucket
        self.prefix = validate_key(prefix.strip("/")) if prefix.strip("/") else ""
        self._root = f"{self.prefix}/" if self.prefix else ""
        self.endpoint_url = (
            endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )
        self.region = (
            region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        ) or "us-east-1"
        env = settings_from_env(os.environ)
        self.settings = S3Settings(
            max_attempts=env.max_attempts if max_attempts is None else max_attempts,
            retry_mode=env.retry_mode if retry_mode is None else retry_mode,
            connect_timeout=env.connect_timeout if connect_timeout is None else connect_timeout,
            read_timeout=env.read_timeout if read_timeout is None else read_timeout,
            transfer_attempts=(
                env.transfer_attempts if transfer_attempts is None else transfer_attempts
            ),
        )
        self.max_attempts = self.settings.max_attempts

        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError
        from s3transfer.exceptions import RetriesExceededError

        self._errors: tuple[type[Exception], ...] = (
            ClientError,
            BotoCoreError,
            RetriesExceededError,
        )
        key_id = os.environ.get("AWS_ACCESS_KEY_ID")
        secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
        if not key_id or not secret:
            raise AccessDenied(
                f"no S3 credentials for {self.uri}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (in a cluster: the Secret named by credentialsSecretRef)",
                uri=self.uri,
            )
        session = boto3.session.Session(
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            aws_session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
            region_name=self.region,
        )
        config = client_config(self.settings, max_concurrency)
        self._client: Any = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        register_content_md5(self._client)
        self._transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            num_download_attempts=self.settings.transfer_attempts,
            use_threads=True,
            preferred_transfer_client="classic",
        )

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint_url={self.endpoint_url!r})"

    @property
    def uri(self) -> str:
        """The store root URI."""
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def uri_for(self, key: str) -> str:
        """The URI of one key."""
        return f"{self.uri}/{validate_key(key)}"

    def _key(self, key: str) -> str:
        return self._root + validate_key(key)

    @contextmanager
    def _manager(self) -> Iterator[Any]:
        from boto3.s3.transfer import create_transfer_manager

        with create_transfer_manager(self._client, self._transfer_config) as manager:
            yield manager

    def _translate(self, exc: Exception, uri: str, direction: Direction) -> StorageError:
        return translate_error(
            exc,
            uri,
            direction,
            bucket=self.bucket,
            endpoint=self.endpoint_url or "AWS S3",
            settings=self.settings,
        )

    def _upload(self, send: Callable[[], object], uri: str) -> None:
        """Run one upload, again when the server says its body arrived damaged (up to
        `transfer_attempts` in all)."""
        attempts = self.settings.transfer_attempts
        for attempt in range(1, attempts + 1):
            try:
                send()
                return
            except self._errors as exc:
                if attempt < attempts and damaged_in_transit(exc):
                    logger.warning(
                        "%s arrived damaged at %s (%s); uploading it again (attempt %d of %d)",
                        uri,
                        self.endpoint_url or "AWS S3",
                        exc,
                        attempt + 1,
                        attempts,
                    )
                    continue
                raise self._translate(exc, uri, "upload") from exc

    def put_file(self, local_path: str | os.PathLike[str], key: str) -> ObjectInfo:
        """Upload a file (multipart and parallel above the threshold) with its sha256."""
        full = self._key(key)
        try:
            size, sha256 = sha256_file(local_path)
        except OSError as exc:
            raise ObjectNotFound(
                f"cannot read local file {local_path}: {exc.strerror or exc}", uri=str(local_path)
            ) from exc
        extra = {"Metadata": {SHA256_METADATA: sha256}}

        def send() -> None:
            with self._manager() as manager:
                manager.upload(os.fspath(local_path), self.bucket, full, extra_args=extra).result()

        self._upload(send, self.uri_for(key))
        logger.debug("Uploaded %s (%d bytes)", self.uri_for(key), size)
        return ObjectInfo(key=key, size=size, sha256=sha256)

    def put_bytes(self, data: bytes, key: str) -> ObjectInfo:
        """Upload small content in one request."""
        sha256 = hashlib.sha256(data).hexdigest()
        request = {
            "Bucket": self.bucket,
            "Key": self._key(key),
            "Body": data,
            "Metadata": {SHA256_METADATA: sha256},
        }
        self._upload(lambda: self._client.put_object(**request), self.uri_for(key))
        return ObjectInfo(key=key, size=len(data), sha256=sha256)

    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> ObjectInfo:
        """Download (ranged and parallel above the threshold) into a temporary file, check
        the size and the recorded sha256, then rename it to `local_path`; bytes that do not
        match are downloaded again, up to `transfer_attempts` times in all.

        Raises:
            ObjectNotFound: there is no such object.
            TransferFailed: the store failed after the retries, or the bytes never matched
                (DownloadFailed); nothing is left at `local_path` or beside it.
        """
        uri = self.uri_for(key)
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TEMP_MARKER, dir=dest.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        attempts = self.settings.transfer_attempts
        try:
            for attempt in range(1, attempts + 1):
                size, sha256, recorded = self._download_once(key, tmp_name)
                if size == recorded[0] and recorded[1] in (None, sha256):
                    os.replace(tmp, dest)
                    return ObjectInfo(key=key, size=size, sha256=sha256)
                found = f"size {size}, sha256 {sha256}; the store recorded {recorded[0]} bytes"
                found += f", sha256 {recorded[1]}" if recorded[1] else ""
                if attempt < attempts:
                    logger.warning(
                        "Download of %s is corrupt (%s); downloading it again (attempt %d of %d)",
                        uri,
                        found,
                        attempt + 1,
                        attempts,
                    )
            raise ObjectCorrupt(
                f"download of {uri} is corrupt on each of {attempts} attempts ({found}): the "
                "object was damaged or replaced in the store, or something on the way damages "
                "it; publish it again (re-run the job) or fix the network path",
                uri=uri,
                reason=Reason.DOWNLOAD_FAILED,
            )
        finally:
            tmp.unlink(missing_ok=True)

    def _download_once(self, key: str, tmp_name: str) -> tuple[int, str, tuple[int, str | None]]:
        """One download into `tmp_name`: its size and sha256, and the size and sha256 the
        store records for the object."""
        full = self._key(key)
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=full)
            with self._manager() as manager:
                manager.download(self.bucket, full, tmp_name).result()
        except self._errors as exc:
            raise self._translate(exc, self.uri_for(key), "download") from exc
        size, sha256 = sha256_file(tmp_name)
        recorded = head.get("Metadata", {}).get(SHA256_METADATA)
        return size, sha256, (int(head.get("ContentLength", size)), recorded)

    def get_bytes(self, key: str) -> bytes:
        """Read a small object whole, checked against its recorded sha256; a body that
        breaks or does not match is read again, up to `transfer_attempts` times in all."""
        uri = self.uri_for(key)
        attempts = self.settings.transfer_attempts
        for attempt in range(1, attempts + 1):
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            except self._errors as exc:  # botocore has retried the request already
                raise self._translate(exc, uri, "download") from exc
            body = response["Body"]  # not `with`: that yields urllib3's stream, unchecked
            try:
                data = cast(bytes, body.read())
            except self._errors as exc:
                if attempt == attempts:
                    raise self._translate(exc, uri, "download") from exc
                logger.warning("Reading %s broke (%s); reading it again", uri, exc)
                continue
            finally:
                body.close()
            recorded = response.get("Metadata", {}).get(SHA256_METADATA)
            sha256 = hashlib.sha256(data).hexdigest()
            if recorded in (None, sha256):
                return data
            if attempt < attempts:
                logger.warning("%s does not match its recorded sha256; reading it again", uri)
        raise TransferFailed(
            f"download of {uri} is corrupt on each of {attempts} attempts (sha256 {sha256}, the "
            f"store recorded {recorded}): the object was damaged or replaced in the store; "
            "publish it again (re-run the job)",
            uri=uri,
            reason=Reason.DOWNLOAD_FAILED,
        )

    def open_read(self, key: str, offset: int = 0) -> BinaryIO:
        """A streaming, buffered reader of the object body from byte `offset` (a ranged GET
        when it is above 0); close it when done. Errors while reading surface as
        `TransferFailed`, like every other failure of the store."""
        if offset < 0:
            raise ValueError(f"negative offset {offset} reading {self.uri_for(key)}")
        uri = self.uri_for(key)
        request = {"Bucket": self.bucket, "Key": self._key(key)}
        if offset:
            request["Range"] = f"bytes={offset}-"
        try:
            response = self._client.get_object(**request)
        except self._errors as exc:
            raise self._translate(exc, uri, "download") from exc
        raw = TranslatingReader(
            response["Body"], self._errors, lambda exc: self._translate(exc, uri, "download")
        )
        reader = io.BufferedReader(raw, buffer_size=CHUNK_SIZE)
        if offset and not str(response.get("ContentRange", "")).startswith(f"bytes {offset}-"):
            # A server that ignores Range sends the whole object: skip what was asked past.
            logger.debug("%s: the server ignored the Range header; skipping %d bytes", uri, offset)
            remaining = offset
            while remaining and (chunk := reader.read(min(remaining, CHUNK_SIZE))):
                remaining -= len(chunk)
        return reader

    def exists(self, key: str) -> bool:
        """Whether the object exists (HEAD; 404 is False, 403 raises `AccessDenied`)."""
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except self._errors as exc:
            error = self._translate(exc, self.uri_for(key), "download")
            if isinstance(error, ObjectNotFound):
                return False
            raise error from exc
        return True

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object under the folder `prefix`, sorted by key (sha256 not fetched)."""
        folder = validate_prefix(prefix)
        found: list[ObjectInfo] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._root + folder
            )
            for page in pages:
                for item in page.get("Contents", []):
                    key = str(item["Key"])[len(self._root) :]
                    try:
                        validate_key(key)
                    except InvalidKey:
                        logger.debug("Skipping unaddressable key %r", item["Key"])
                        continue
                    found.append(ObjectInfo(key=key, size=int(item["Size"])))
        except self._errors as exc:
            raise self._translate(exc, self.uri + "/" + folder, "download") from exc
        return sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        """Delete one object (missing is fine)."""
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except self._errors as exc:
            raise self._translate(exc, self.uri_for(key), "upload") from exc

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the folder `prefix`, 1000 per request."""
        folder = validate_prefix(prefix)
        if not folder:
            raise StorageError(f"refusing to delete the whole store {self.uri}", uri=self.uri)
        keys = [self._root + info.key for info in self.list(folder)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            try:
                response = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            except self._errors as exc:
                raise self._translate(exc, f"{self.uri}/{folder}", "upload") from exc
            if response.get("Errors"):
                first = response["Errors"][0]
                raise TransferFailed(
                    f"could not delete {len(response['Errors'])} objects under "
                    f"{self.uri}/{folder} (first: {first.get('Key')}: {first.get('Code')})",
                    uri=f"{self.uri}/{folder}",
                )
        return len(keys)
