"""Outputs handed from one host to another through an object store (S3, served by moto).

Two "hosts" are simulated on this machine: two cores with different host identities
(``SOAF_HOST_ID``, which soaf compares wherever it asks "same machine?", see
``soaf.config.host_name``), different node names and separate work roots (two tmpfs
dirs). They share the kernel (boot id, PIDs); soaf consults those only for a core of the
same host, so to soaf they are two machines: a ``soaf://`` reference made on one does not
resolve to a path on the other. No ``unshare`` is needed for that. The producer runs on
host A (core A alone is up), then core A stops and the consumer runs on host B, which can
reach host A's outputs only through the store.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import soaf
from soaf import Pipeline, ServiceParamTemplate
from tests.conftest import CoreProcess
from tests.objectstore import BUCKET, ObjectStore, s3  # noqa: F401 (fixture)

MAKE = "head -c 200000 /dev/urandom > data.bin && mkdir -p sub && echo hi > sub/note.txt"


def shell(script: str, **fields) -> ServiceParamTemplate:
    return ServiceParamTemplate("shell", args={"script": script}, **fields)


@pytest.fixture
def host(start_core, s3: ObjectStore) -> Iterator[Callable[[str], CoreProcess]]:
    """``host("a")`` starts the core of host a: its own host id, node and work root."""
    roots: list[str] = []

    def start(name: str) -> CoreProcess:
        root = tempfile.mkdtemp(prefix=f"soaf-host-{name}-", dir="/dev/shm"
                                if os.access("/dev/shm", os.W_OK) else None)
        roots.append(root)
        return start_core(SOAF_NODE=f"core-{name}", SOAF_HOST_ID=f"host-{name}",
                          SOAF_WORK_ROOT=root, **s3.env)

    yield start
    import shutil

    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


def test_output_target_in_s3_feeds_a_step_on_another_host(host, client, s3: ObjectStore):
    a_core = host("a")
    a = client.submit(shell(MAKE, output_files=["data.bin", "sub/note.txt"],
                            output_target=f"s3://{BUCKET}/{{service_id}}/"))
    producer = client.wait(a, 60)
    assert producer.state == "succeeded", producer.error
    assert producer.get("host") == "host-a"
    assert [o["url"] for o in producer.outputs] == [
        f"s3://{BUCKET}/{a}/data.bin", f"s3://{BUCKET}/{a}/sub/note.txt"]
    stored = s3.fs().cat_file(f"{BUCKET}/{a}/data.bin")
    made = Path(producer.get("work_dir")) / "data.bin"
    assert stored == made.read_bytes()
    a_core.stop()

    b_core = host("b")  # a reference and a plain URL: both staged from the store
    b = client.submit(shell("sha256sum data.bin > sum.txt; cat note.txt >> sum.txt",
                            input_files={"data.bin": soaf.output_ref(a, "data.bin"),
                                         "note.txt": f"s3://{BUCKET}/{a}/sub/note.txt"},
                            output_files=["sum.txt"]))
    consumer = client.wait(b, 60)
    assert consumer.state == "succeeded", consumer.error
    assert consumer.get("host") == "host-b"
    work_dir = Path(consumer.get("work_dir"))
    assert not work_dir.is_relative_to(made.parents[1])  # another work root
    by_name = {i["name"]: i for i in consumer.inputs}
    assert by_name["data.bin"]["resolved"] == f"s3://{BUCKET}/{a}/data.bin"
    assert by_name["data.bin"]["mode"] == "download"
    digest, note = (work_dir / "sum.txt").read_text().split("\n")[0].split()[0], "hi"
    assert digest == hashlib.sha256(stored).hexdigest()
    assert (work_dir / "sum.txt").read_text().splitlines()[-1] == note
    assert b_core.alive()


def test_pipeline_with_a_store_hands_outputs_across_hosts(host, client, s3: ObjectStore):
    a_core = host("a")
    prefix = f"s3://{BUCKET}/runs/"
    with Pipeline(client, store=prefix) as p:
        a = p.run(shell(MAKE, output_files=["data.bin", "sub/*.txt"]))
        producer = a.wait(60)
        a_core.stop()  # host A is gone: host B can only use the store
        host("b")
        b = p.run(lambda a: shell("sha256sum data.bin note.txt > sums.txt",
                                  input_files={"data.bin": a.output("data.bin"),
                                               "note.txt": a.outputs["sub/note.txt"]},
                                  output_files=["sums.txt"]), after=[a])
        consumer = b.wait(60)
    assert producer.get("host") == "host-a" and consumer.get("host") == "host-b"
    assert a.output("data.bin") == f"s3://{BUCKET}/runs/{a.service_id}/data.bin"
    assert producer.get("output_target") == f"s3://{BUCKET}/runs/{a.service_id}/"
    assert {i["source"] for i in consumer.inputs} == {
        f"s3://{BUCKET}/runs/{a.service_id}/data.bin",
        f"s3://{BUCKET}/runs/{a.service_id}/sub/note.txt"}
    fs = s3.fs()
    sums = fs.cat_file(f"{BUCKET}/runs/{b.service_id}/sums.txt").decode()  # b uploaded too
    stored = fs.cat_file(f"{BUCKET}/runs/{a.service_id}/data.bin")
    assert sums.split()[0] == hashlib.sha256(stored).hexdigest()


def test_a_store_must_be_a_url(client):
    with pytest.raises(soaf.PipelineError, match="store must be the URL of an object store"):
        Pipeline(client, store="/not/a/url")
