"""The user-facing error and the wrapper that prints it as one line (no heavy imports)."""
import sys


class CutPasteError(Exception):
    """A user-facing error: bad input, missing files. Printed as one line, no traceback."""


def run_main(main):
    """Run an entry point; turn CutPasteError into a one-line message and exit code 2."""
    try:
        return main()
    except CutPasteError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)  # one line, whatever the message holds
        sys.exit(2)
