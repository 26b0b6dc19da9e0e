"""The `tunelab` command.

Each subcommand lives in its own module with two functions, `add_arguments(parser)` and `run(args)`;
only the chosen one is imported, so `tunelab --help` is instant. A `TunelabError` (anything the user can
fix) is printed as one line and exits with status 2, and so is an OSError (a path that cannot be read or
written); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from tunelab.errors import TunelabError

# name -> (module, one-line help). Keep sorted by how a user meets them.
COMMANDS = {
    "quickstart": ("tunelab.quickstart", "fine-tune the bundled model with QLoRA and show before/after quality"),
    "train": ("tunelab.train.cli", "train from a YAML config: pretrain or SFT with full, freeze, lora or qlora"),
    "quantize": ("tunelab.quant.cli", "quantize a model's linear weights to nf4/fp4/int8/int4 and report the error"),
    "data": ("tunelab.data.cli", "build, inspect, filter and scan training data"),
    "eval": ("tunelab.eval.cli", "evaluate a model or run: perplexity, tasks, hallucination, injection"),
    "detect": ("tunelab.eval.detect_cli", "find labelled spans (e.g. injections) in documents with a trained spans run; --redact masks them"),
    "merge": ("tunelab.export.cli.merge", "merge a LoRA/QLoRA adapter into its base and save a Hugging Face folder"),
    "export": ("tunelab.export.cli.export", "export a model or run to GGUF (f32/f16/q8_0/q4_0/k-quants) for llama.cpp and Ollama"),
    "generate": ("tunelab.export.cli.generate", "greedy answers from a model or run, adapter on the fly or merged"),
    "chat": ("tunelab.export.cli.chat", "chat in the terminal with a model or run (chat template, streaming)"),
    "sweep": ("tunelab.experiments.sweep_cli", "run a resumable grid of training runs (method x lr x batch size ...) and report the optima"),
    "cost": ("tunelab.experiments.cost_cli", "parameters, memory and FLOPs of each training method before you launch; --measure runs a few steps"),
    "board": ("tunelab.board.cli", "a local web dashboard of your runs: curves (live), data masks, evaluations, side-by-side chat"),
    "doctor": ("tunelab.accel.doctor", "versions, CPU and GPU, and which speed-ups run here (and why the others do not)"),
}


DESCRIPTION = """\
tunelab: pretrain, fine-tune and evaluate language models from one YAML config, on a laptop CPU
or a CUDA GPU. Methods: full, freeze, LoRA and QLoRA (LoRA over a frozen 4-bit base); tasks:
pretraining on a weighted data mixture and supervised fine-tuning with loss on responses only;
then evaluation (perplexity, tasks, hallucination, prompt injection) and export (merged Hugging
Face folder, GGUF for llama.cpp and Ollama)."""

EPILOG = """\
a first run:
  tunelab quickstart                        QLoRA on the bundled SmolLM2-135M, quality before/after
  tunelab train configs/lora-sft.yaml       a new run in runs/lora-sft-<UTC time>/ (runs/latest)
  tunelab eval runs/latest                  evaluate it
`tunelab COMMAND --help` shows a command's options."""


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    from tunelab import __version__

    parser = argparse.ArgumentParser(prog="tunelab", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == command:
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show a traceback on errors")
            importlib.import_module(module).add_arguments(p)
    return parser


# Set by the docs test (tests/project/test_docs.py) when it runs the README's and docs' runnable blocks: every run
# stops after 2 optimizer steps and 1 eval batch, and `tunelab eval` builds 1 item per family / kind / document
# (`--n 1`), so a recipe written for a real job runs in CI in seconds.
TINY_ENV = "TUNELAB_DOCS_TINY"
TINY_OVERRIDES = ["train.max_steps=2", "train.eval_batches=1"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse a command line as `main` does, without running it (argparse exits 2 on a bad one)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = _parser(command if command in COMMANDS else None)
    args, unknown = parser.parse_known_args(argv)
    # `key=value` overrides may come after options (argparse stops a positional list at the first option)
    if unknown and hasattr(args, "overrides") and all("=" in u and not u.startswith("-") for u in unknown):
        args.overrides = list(args.overrides) + unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if os.environ.get(TINY_ENV) == "1":
        if hasattr(args, "overrides"):
            args.overrides = list(args.overrides) + TINY_OVERRIDES
        if getattr(args, "max_steps", 0) is None:  # quickstart's --max-steps
            args.max_steps = 2
        if args.command == "eval":
            args.n = 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        _parser().print_help()
        return 2
    debug = args.debug or os.environ.get("TUNELAB_DEBUG") == "1"
    try:
        code = importlib.import_module(COMMANDS[args.command][0]).run(args)
    except TunelabError as e:
        if debug:
            raise
        print(f"tunelab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path given that cannot be used: a file where a folder goes, a missing parent, ...
        if debug:
            raise
        where = e.filename2 or e.filename  # os.replace(tmp, dest) names dest second
        print(f"tunelab {args.command}: error: {f'{where}: ' if where else ''}{e.strerror or e} "
              "(check that path; --debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tunelab {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
