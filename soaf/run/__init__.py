"""One service on a core: its run, each attempt, the callback loop, outcomes, journal, policy.
"""
