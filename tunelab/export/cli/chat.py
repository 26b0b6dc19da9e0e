"""`tunelab chat MODEL_OR_RUN`: a terminal chat with the model's chat template, streaming, stopping at EOS."""

from __future__ import annotations

from tunelab.errors import TunelabError
from tunelab.export.cli import add_model_arguments, add_placement_arguments


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    add_placement_arguments(parser)
    parser.add_argument("--guard", metavar="RUN", help="a data.task=spans run (e.g. configs/spans-injection.yaml): "
                                                       "the spans it detects are cut from each prompt first")
    parser.add_argument("--system", help="a system message for the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer per turn")


def run(args) -> int:
    import sys

    from tunelab.export.chat import chat_loop
    from tunelab.export.cli import open_from_args

    if args.max_new_tokens < 1:  # before loading the model
        raise TunelabError(f"--max-new-tokens must be 1 or more, got {args.max_new_tokens}")
    guard = None
    if args.guard:  # the detector first: a bad RUN fails before the model loads
        from tunelab.eval.guard import Guard

        guard = Guard(args.guard)
    opened = open_from_args(args)
    chat_loop(opened.model, opened.tokenizer, sys.stdin, sys.stdout, args.system, args.max_new_tokens, guard)
    return 0
