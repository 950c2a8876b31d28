"""Watcher handlers: one WatcherHandler subclass per service name."""
