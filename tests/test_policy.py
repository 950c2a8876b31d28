"""One policy for limits and retries: the template's value where it sets one, else the
service's; first runs, retries and recovery all use it."""

from __future__ import annotations

from soaf import ServiceParamTemplate, ServiceProgramTemplate
from soaf.core.recovery import lost_budget
from soaf.plugin.loader import Registry
from soaf.run.policy import policy_for


class Patient(ServiceProgramTemplate):
    name = "patient"
    retries = 2
    retry_backoff = 3.0
    retry_backoff_max = 10.0
    timeout = 60.0
    max_memory_mb = 2
    retry_on = frozenset({"exit_code"})


def test_the_service_fills_in_what_the_template_leaves_unset():
    p = policy_for(ServiceParamTemplate("patient"), Patient)
    assert (p.retries, p.retry_backoff, p.timeout, p.max_memory_kb) == (2, 3.0, 60.0, 2048)
    assert p.max_attempts == 3


def test_a_template_value_wins_and_zero_retries_means_none():
    t = ServiceParamTemplate("patient", retries=0, timeout=5, retry_backoff=0.5)
    p = policy_for(t, Patient)
    assert (p.retries, p.max_attempts, p.timeout, p.retry_backoff) == (0, 1, 5.0, 0.5)
    assert p.retry_delay("failed", "exit_code", failed=1) is None


def test_retry_delays_double_up_to_the_cap_and_follow_retry_on():
    p = policy_for(ServiceParamTemplate("patient", retries=5), Patient)
    assert [p.retry_delay("failed", "exit_code", n) for n in (1, 2, 3)] == [3.0, 6.0, 10.0]
    assert p.retry_delay("timed_out", "exit_code", 1) == 3.0
    assert p.retry_delay("failed", "memory", 1) is None  # not in retry_on
    assert p.retry_delay("cancelled", None, 1) is None
    assert p.retry_delay("failed", "exit_code", 6) is None  # retries used up


def test_lost_attempts_have_their_own_budget():
    registry = Registry(number=1, digest="0" * 64, programs={"patient": Patient})
    assert lost_budget(ServiceParamTemplate("patient"), registry) == 3
    assert lost_budget(ServiceParamTemplate("patient", retries=0, max_lost=0), registry) == 0
    assert lost_budget(ServiceParamTemplate("gone", max_lost=5), registry) == 5

    class Fragile(Patient):
        max_lost = 1

    assert policy_for(ServiceParamTemplate("x"), Fragile).max_lost == 1


def test_needs_come_from_the_template_over_the_service():
    from soaf.run.policy import Needs, needs_for

    class Heavy:
        cpus = 2
        memory_mb = None

    assert needs_for(ServiceParamTemplate("x"), None) is None
    assert needs_for(ServiceParamTemplate("x"), Heavy) == Needs(cpus=2.0)
    assert needs_for(ServiceParamTemplate("x", cpus=0.5, memory_mb=300), Heavy) == \
        Needs(cpus=0.5, memory_mb=300.0)
    assert policy_for(ServiceParamTemplate("x"), Heavy).needs == Needs(cpus=2.0)
