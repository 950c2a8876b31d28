"""Prometheus metrics of a core (``soaf core --metrics-port``), on the prometheus-client
library: what a core counts as services pass through it, and what it reads from its parts
when it is scraped. Nothing here knows Redis or the daemon; the core hands in callables.
"""
