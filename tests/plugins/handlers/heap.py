"""Counts what the core leaves for the cyclic garbage collector (it runs in the core).

``do: arm`` collects, then keeps whatever later collections find (DEBUG_SAVEALL);
``do: count`` collects and records the soaf objects found that way since the arm, by type.
"""

import collections
import gc

from soaf import WatcherHandler


class HeapHandler(WatcherHandler):
    service = "heap"

    def after_watch_callback(self, service, files):
        do = service.template.args.get("do")
        if do == "arm":
            gc.collect()
            gc.garbage.clear()
            gc.set_debug(gc.DEBUG_SAVEALL)
        elif do == "count":
            gc.collect()
            kinds = collections.Counter(
                f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage
                if type(o).__module__.startswith("soaf."))
            gc.set_debug(0)
            gc.garbage.clear()
            service.set(garbage=sum(kinds.values()), kinds=dict(kinds.most_common(8)),
                        frozen=gc.get_freeze_count(), threshold=gc.get_threshold())
