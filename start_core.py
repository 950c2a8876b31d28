"""Start a soaf core: ``python start_core.py --help`` lists the options."""

from soaf.cli.main import main

if __name__ == "__main__":
    main(["core", *__import__("sys").argv[1:]])
