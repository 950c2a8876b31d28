"""A real S3-compatible server for the cross-host tests: moto's server mode, in-process.

``ThreadedMotoServer`` answers the S3 API over HTTP on a loopback port; cores started by
a test reach it like any S3 endpoint, through s3fs, with the standard AWS variables
(``env``). Import the fixture into a test module (``from tests.objectstore import s3``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

BUCKET = "soaf-handoff"


class ObjectStore:
    """The server, one bucket, and what a core (or s3fs here) needs to reach it."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {"AWS_ACCESS_KEY_ID": "soaf-test", "AWS_SECRET_ACCESS_KEY": "soaf-test",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": self.endpoint}
        import boto3  # s3fs's mkdir sends a location constraint moto refuses

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                     aws_access_key_id="soaf-test", aws_secret_access_key="soaf-test",
                     ).create_bucket(Bucket=BUCKET)

    def fs(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(key="soaf-test", secret="soaf-test", skip_instance_cache=True,
                                 client_kwargs={"endpoint_url": self.endpoint,
                                                "region_name": "us-east-1"})

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def s3() -> Iterator[ObjectStore]:
    store = ObjectStore()
    yield store
    store.stop()
