"""The developer API (program, handler, service) and the machinery that loads plugins.
"""
