"""Delete runs' artifacts: `python -m kubetune.storage.delete RUN_URI… [--endpoint-url U]
[--region R]`.

The operator runs this in a short-lived pod (with the job's storage credentials) when a
FineTuneJob with `output.deletePolicy: Delete` is deleted. Every URI must be a run
(`<root>/<namespace>/<job>/<run-id>`) or a job's prefix (`<root>/<namespace>/<job>`): one
with fewer than two path segments below its bucket or claim is refused, so a mistyped URI
cannot wipe a bucket. Deleting what is already gone succeeds: the pod can be
retried. Exit codes: 0 done, 2 refused URI, 1 storage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kubetune.storage.errors import InvalidKey
from kubetune.storage.store import open_store

MIN_DEPTH = 2
"""Path segments a URI needs below its bucket or claim (at least `<namespace>/<job>`)."""


def split_uri(uri: str) -> tuple[str, str]:
    """(parent, last segment) of a prefix URI, refusing any URI that could hold more than
    one job's artifacts (fewer than `<namespace>/<job>` below the bucket, claim or root).

    Raises:
        InvalidKey: the URI is too shallow, or not s3://, pvc://, file:// or a local path.
    """
    scheme, sep, rest = uri.rstrip("/").partition("://")
    if sep and scheme not in {"s3", "pvc", "file"}:
        raise InvalidKey(f"{uri}: expected an s3://, pvc://, file:// URI or a local path")
    path = rest if sep else uri.rstrip("/")
    segments = path.split("/")
    below = segments[1:] if sep and scheme != "file" else [s for s in segments if s]
    minimum = MIN_DEPTH if sep and scheme != "file" else MIN_DEPTH + 1
    if len(below) < minimum or any(s in {"", ".", ".."} for s in below):
        raise InvalidKey(
            f"{uri}: refusing to delete: not a run (<root>/<namespace>/<job>/<run-id>) or a "
            "job's prefix (<root>/<namespace>/<job>)"
        )
    parent, _, last = uri.rstrip("/").rpartition("/")
    return parent, last


def delete(uri: str, endpoint_url: str | None = None, region: str | None = None) -> int:
    """Delete every object under `uri`; returns how many were deleted (0 when already
    gone)."""
    parent, last = split_uri(uri)
    return open_store(parent, endpoint_url=endpoint_url, region=region).delete_prefix(last + "/")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune.storage.delete", description=__doc__.splitlines()[0]
    )
    parser.add_argument("uris", nargs="+", metavar="RUN_URI")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint (MinIO, Ceph, …)")
    parser.add_argument("--region", default=None, help="S3 region")
    args = parser.parse_args(argv)
    try:
        for uri in args.uris:
            split_uri(uri)
    except InvalidKey as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for uri in args.uris:
        try:
            count = delete(uri, args.endpoint_url, args.region)
        except Exception as error:
            print(f"error: deleting {uri}: {error}", file=sys.stderr)
            return 1
        print(f"Deleted {count} objects under {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
