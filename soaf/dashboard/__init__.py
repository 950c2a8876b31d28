"""``soaf dashboard``: web pages and a JSON API over the Redis that soaf cores share.

A client-side process (it imports soaf's client and protocol layers, never the core):
server-rendered HTML (Jinja2, every value escaped), live updates as server-sent events
through one subscription per dashboard process (soaf.dashboard.live), actions that need
a token (soaf.dashboard.auth), and ``/api`` for any language (soaf.dashboard.api).
"""
