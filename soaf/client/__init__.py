"""Clients: ``Client`` and ``AsyncClient`` over one set of sans-I/O calls; following, pipelines, logs.

Never imports the core, the run machinery, processes or plugin loading.
"""
