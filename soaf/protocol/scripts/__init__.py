"""Every Lua script soaf runs in Redis, in this one package, and how they are called.

Each change that must be atomic is one script: submitting, claiming an entry for an
attempt, writing a batch of record changes, cancelling, reclaiming a lost attempt, taking
over a dead node's entries (judged only where a core sees its own heartbeat), the
heartbeat's compare-and-set, the plugin version counter and the fleet-wide concurrency
slots. Together they show every multi-key change soaf makes.

* ``records``: what changes a service's record;
* ``guard``: the Lua those scripts start with (Redis is not trusted);
* ``nodes``: heartbeats, takeover, plugin version numbers;
* ``slots``: ``max_concurrent`` across the fleet;
* ``pipelines``: the steps of named pipelines;
* ``queues``: the per-service queues: a core's take, a put-back;
* ``script``: ``Script`` (EVALSHA, the text sent only when Redis lacks it).
"""

from soaf.protocol.scripts.nodes import (
    CAS_LUA,
    MISSING_LUA,
    NEXT_NUMBER_LUA,
    REFRESH_LUA,
    RELEASE_LUA,
    TAKEOVER_LUA,
)
from soaf.protocol.scripts.pipelines import RECORD_STEP, RECORD_STEP_LUA
from soaf.protocol.scripts.queues import REQUEUE, REQUEUE_LUA, TAKE, TAKE_LUA
from soaf.protocol.scripts.records import (
    CANCEL,
    CANCEL_LUA,
    CLAIM,
    CLAIM_LUA,
    FINISH,
    FINISH_LUA,
    NOTE,
    RECLAIM,
    RECLAIM_LUA,
    RECORD,
    RECORD_LUA,
    SUBMIT,
    SUBMIT_LUA,
    UNREAD_CANCEL,
)
from soaf.protocol.scripts.script import Script, is_noscript
from soaf.protocol.scripts.slots import TAKE_SLOT, TAKE_SLOT_LUA

__all__ = [
    "CANCEL", "CANCEL_LUA", "CAS_LUA", "CLAIM", "CLAIM_LUA", "FINISH", "FINISH_LUA",
    "MISSING_LUA", "NEXT_NUMBER_LUA", "NOTE",
    "RECLAIM", "RECLAIM_LUA", "RECORD", "RECORD_LUA", "RECORD_STEP", "RECORD_STEP_LUA",
    "REFRESH_LUA", "RELEASE_LUA", "REQUEUE", "REQUEUE_LUA", "SUBMIT", "SUBMIT_LUA", "TAKE",
    "TAKEOVER_LUA", "TAKE_LUA", "TAKE_SLOT", "TAKE_SLOT_LUA", "UNREAD_CANCEL", "Script",
    "is_noscript",
]
