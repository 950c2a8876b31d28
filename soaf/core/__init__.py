"""The daemon: wiring, intake, heartbeat, recovery, the state writer, limits, logs, embedded Redis.
"""
