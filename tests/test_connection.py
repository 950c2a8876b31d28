"""Redis URLs as soaf prints them: passwords hidden, the address intact."""

from soaf.connection import redact


def test_redact_hides_passwords_and_keeps_unix_paths():
    assert redact("unix:///tmp/r.sock") == "unix:///tmp/r.sock"
    assert redact("unix:///tmp/r.sock?password=s3cret&db=1") == "unix:///tmp/r.sock?password=***&db=1"
    assert redact("unix://:s3cret@/tmp/r.sock") == "unix://:***@/tmp/r.sock"
    assert redact("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact("rediss://host:6380") == "rediss://host:6380"
