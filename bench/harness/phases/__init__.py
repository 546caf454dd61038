"""One module per phase, or per family of phases, of bench/run.sh. Each
``cmd_<phase>(args)`` takes the parsed arguments of its subcommand
(bench/harness/cli.py) and writes its JSON part to ``args.part``."""
