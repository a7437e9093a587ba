"""The command-line entry points besides trainer/main.py: each parses its arguments, makes one call into the library
and prints. `python -m transrec.trainer.commands.<name>`."""
