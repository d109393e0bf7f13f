"""The command line: every flag declared once and shared through argparse parents (options.py); imports nothing
heavy, so that every script's --help answers at once."""
