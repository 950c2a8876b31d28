"""The ``soaf`` command line.
"""
