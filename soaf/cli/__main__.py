"""``python -m soaf.cli``: the ``soaf`` command."""

from soaf.cli.main import main

main()
