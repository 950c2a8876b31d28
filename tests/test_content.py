"""The content digest of a template: the same work gives the same digest, anything else not."""

from __future__ import annotations

from dataclasses import dataclass

from soaf import ServiceParamTemplate
from soaf.protocol.content import template_digest


@dataclass
class Tagged(ServiceParamTemplate):
    tag: str = ""


def test_identity_does_not_count_content_does():
    a = ServiceParamTemplate("s", input_files={"a": "/x", "b": "/y"}, args={"n": 1, "m": [1, 2]})
    b = ServiceParamTemplate("s", input_files={"b": "/y", "a": "/x"}, args={"m": [1, 2], "n": 1})
    b.signed_at = 123.0
    assert a.service_id != b.service_id
    assert template_digest(a) == template_digest(b)
    for changed in (ServiceParamTemplate("t"), ServiceParamTemplate("s", args={"n": 2}),
                    ServiceParamTemplate("s", env={"X": "1"}), ServiceParamTemplate("s", timeout=5),
                    ServiceParamTemplate("s", output_files=["o"])):
        assert template_digest(changed) != template_digest(ServiceParamTemplate("s"))


def test_types_and_subclasses_are_told_apart():
    assert template_digest(ServiceParamTemplate("s", args={"n": 1})) != template_digest(
        ServiceParamTemplate("s", args={"n": "1"}))
    assert template_digest(ServiceParamTemplate("s", args={"n": 1})) != template_digest(
        ServiceParamTemplate("s", args={"n": 1.0}))
    assert template_digest(Tagged("s")) != template_digest(ServiceParamTemplate("s"))
    assert template_digest(Tagged("s", tag="a")) != template_digest(Tagged("s", tag="b"))
    # Keys of mixed types, sets and odd values still give one digest.
    odd = ServiceParamTemplate("s", args={1: "a", "1": {2, 1}, (1, 2): None})
    assert template_digest(odd) == template_digest(
        ServiceParamTemplate("s", args={(1, 2): None, "1": {1, 2}, 1: "a"}))
