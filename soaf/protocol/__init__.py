"""The wire: Redis keys, state records and events, Lua scripts, the template, the signed payload codec.

Imports nothing of soaf but ``soaf.errors``: a client in any language needs only what this package defines.
"""
