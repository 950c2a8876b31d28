"""Data in and out of a work dir: work dirs, staging, outputs, handoff, run markers, retention.

Knows no Redis: a ``soaf://`` reference is resolved through a lookup function handed in.
"""
