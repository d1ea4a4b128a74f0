"""Where a bad-input case writes its files, and the small writers the cases share.

Every case gets a fresh folder (pytest's tmp_path); the tiny random model is shared and read
only (a case that breaks a model folder copies it first). S3 inputs go to the catalog's
moto server, over real HTTP.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

S3_BUCKET = "bad-input"


@dataclass(frozen=True)
class Workspace:
    """One case's folder, the shared tiny model, and the S3 endpoint (if the run has one)."""

    root: Path
    model: Path
    s3_endpoint: str = ""

    @property
    def output(self) -> Path:
        """The local artifact root of the case's runs."""
        return self.root / "out"

    @property
    def work(self) -> Path:
        """The trainer's scratch folder."""
        return self.root / "work"

    def write(self, name: str, content: str | bytes) -> str:
        """A file under the workspace; returns its path as the URI a spec uses."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return str(path)

    def jsonl(self, name: str, rows: Iterable[Any]) -> str:
        """A JSONL file, one row a line (rows that are str are written as they are)."""
        lines = (r if isinstance(r, str) else json.dumps(r) for r in rows)
        return self.write(name, "".join(line + "\n" for line in lines))

    def model_copy(self, name: str, edit: Callable[[Path], None]) -> str:
        """A copy of the tiny model folder, changed by `edit`."""
        target = self.root / name
        shutil.copytree(self.model, target)
        edit(target)
        return str(target)

    def s3_env(self, *, secret: str = "secret") -> dict[str, str]:
        """The environment that points boto3 at the catalog's S3 server (fake credentials,
        never the developer's ~/.aws)."""
        assert self.s3_endpoint, "this case needs the s3 endpoint"
        return {
            "AWS_ACCESS_KEY_ID": "key",
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
            "AWS_CONFIG_FILE": str(self.root / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.root / "aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def s3_put(self, key: str, body: bytes) -> str:
        """An object in the catalog's bucket (created on first use); returns its URI."""
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id="key",
            aws_secret_access_key="secret",
            config=Config(s3={"addressing_style": "path"}),
        )
        if S3_BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=S3_BUCKET)
        client.put_object(Bucket=S3_BUCKET, Key=key, Body=body)
        return f"s3://{S3_BUCKET}/{key}"


def alpaca(count: int, start: int = 0) -> list[dict[str, str]]:
    """Distinct, valid Alpaca rows (short enough for any maxSeqLength of the catalog)."""
    return [
        {"instruction": f"Write the number {i} in words.", "output": f"It is number {i}."}
        for i in range(start, start + count)
    ]


def conversations(count: int, roles: tuple[str, ...]) -> list[dict[str, Any]]:
    """Conversations whose turns have these roles, in order."""
    return [
        {
            "messages": [
                {"role": r, "content": f"Turn {n} of talk {i}."} for n, r in enumerate(roles)
            ]
        }
        for i in range(count)
    ]


def preference(count: int, *, rejected: bool = True, same: bool = False) -> list[dict[str, str]]:
    """Preference pairs; without `rejected`, or with rejected equal to chosen."""
    rows = []
    for i in range(count):
        row = {"prompt": f"Question {i}?", "chosen": f"A good answer to {i}."}
        if rejected:
            row["rejected"] = row["chosen"] if same else f"A poor answer to {i}."
        rows.append(row)
    return rows


def edit_json(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change a JSON file in place."""
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")
