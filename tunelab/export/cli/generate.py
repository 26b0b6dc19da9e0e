"""`tunelab generate MODEL_OR_RUN --prompt TEXT`: greedy answers, adapter applied on the fly or merged."""

from __future__ import annotations

from tunelab.errors import TunelabError
from tunelab.export.cli import add_model_arguments, add_placement_arguments


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    add_placement_arguments(parser)
    parser.add_argument("--guard", metavar="RUN", help="a data.task=spans run (e.g. configs/spans-injection.yaml): "
                                                       "the spans it detects are cut from each prompt first")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--no-chat", action="store_true", help="continue the raw text, no chat template")
    parser.add_argument("--system", help="a system message before each prompt (chat only)")


def run(args) -> int:
    import sys

    from tunelab.eval.generate import generate
    from tunelab.export.cli import open_from_args

    if args.max_new_tokens < 1:  # before loading the model
        raise TunelabError(f"--max-new-tokens must be 1 or more, got {args.max_new_tokens}")
    prompts = args.prompt
    if args.guard:  # the detector first: a bad RUN fails before the model loads
        from tunelab.eval.guard import Guard, guard_note

        prompts = Guard(args.guard).clean(args.prompt)
        print(guard_note(args.prompt, prompts), file=sys.stderr)
    opened = open_from_args(args)
    answers = generate(opened.model, opened.tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                       chat=not args.no_chat, system=args.system, progress=False)
    for prompt, answer in zip(args.prompt, answers):
        if len(args.prompt) > 1:
            print(f"### {prompt}")
        print(answer)
    return 0
