"""`tunelab train CONFIG.yaml [key=value ...]`: one run of any method and task.

Each run writes to a new folder runs/<CONFIG name>-<UTC time> (runs/latest links the newest) unless
output_dir is set; a folder holding a run is continued with resume=true or replaced with --overwrite.
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("config", help="a YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.lr=1e-4 output_dir=runs/x resume=true")
    p.add_argument("--show-config", action="store_true", help="print the validated config with defaults and exit")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in output_dir (its checkpoints, metrics and adapter/model are deleted)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")


def run(args) -> int:
    from pathlib import Path

    from tunelab.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    if args.show_config:
        print(dump_config(cfg), end="")
        return 0
    from tunelab.train.run import run_training

    s, _ = run_training(cfg, progress=not args.no_progress, name=Path(args.config).stem,
                        overwrite=args.overwrite)
    if "output" in s:
        print(f"loss {s['first_loss']:.4f} -> {s['final_loss']:.4f} over {s['steps']} steps"
              + (f", eval loss {s['eval_loss']:.4f}" if s["eval_loss"] is not None else "")
              + f"; {s['method']} output: {s['output']}")
    return 0
