"""A real S3 API on 127.0.0.1 for the artifact-store tests: moto's server mode, in a thread of
the test process, read back with boto3 (a client other than the one under test)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest


class S3Server:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.access_key = "AKIA" + secrets.token_hex(8).upper()
        self.secret_key = "s3-canary-" + secrets.token_hex(16)

    def stop(self) -> None:
        self._server.stop()

    @property
    def env(self) -> dict[str, str]:
        """What a user sets for an S3-compatible store, as for the AWS CLI."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def client(self) -> Any:
        import boto3  # type: ignore[import-untyped]

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
        )  # fmt: skip

    def new_bucket(self) -> str:
        name = "runs-" + secrets.token_hex(6)
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """Every object under `prefix`, by key."""
        s3 = self.client()
        found: dict[str, bytes] = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for entry in page.get("Contents", []):
                body = s3.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()
                found[entry["Key"]] = body
        return found


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    try:
        yield server
    finally:
        server.stop()
