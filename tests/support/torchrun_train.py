"""Under torchrun: `tunelab train` once per argument ("CONFIG key=value ..."), all in one process group, so the
tests pay torchrun's start-up (about 10 s on 2 busy cores) once for several runs."""

import sys

from tunelab.cli import main

if __name__ == "__main__":
    for run in sys.argv[1:]:
        code = main(["train", *run.split(), "--no-progress"])
        if code:
            sys.exit(code)
