"""`tunelab eval SOURCE`: run the evaluation suites and write a side-by-side report (base vs tuned).

SOURCE is a training run folder (its config.yaml names the base model; its adapter/ or model/ is the tuned
one), a Hugging Face model folder, a .gguf file, or `bundled`. With a plain model, `--adapter DIR` adds
the tuned column (the adapter loaded on top of that model).
"""

from __future__ import annotations

from pathlib import Path

from tunelab.eval.stats import BASELINE_NOTE

SUITE_CHOICES = ("tasks", "sensitivity", "ppl", "hallucination", "injection", "all")


def add_arguments(p) -> None:
    p.add_argument("source", metavar="RUN_OR_MODEL", help="run folder, HF model folder, .gguf file, or `bundled`")
    p.add_argument("--suite", action="append", choices=SUITE_CHOICES,
                   help="suite to run (repeatable; default: tasks). `all` runs every suite")
    p.add_argument("--adapter", help="a PEFT-layout LoRA adapter folder to evaluate on top of the model")
    p.add_argument("--n", type=int, default=20, help="items per family / per kind / documents (default 20)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the built-in items (default 1234)")
    from tunelab.eval.tasks import COLLECTIONS

    p.add_argument("--collection", default="quickstart", choices=COLLECTIONS,
                   help="task families of the tasks and sensitivity suites: quickstart (14, default) or "
                        "instruct (55, with held-out phrasings; docs/eval.md)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data", action="append", default=[], metavar="SUITE=FILE.jsonl",
                   help="your own data for a suite instead of the built-in items (schemas: docs/eval.md)")
    p.add_argument("--skip-base", action="store_true", help="evaluate only the tuned model of a run/adapter")
    p.add_argument("--out", help="report folder (default: RUN/eval for a run, else eval-report)")
    from tunelab.export.cli import add_placement_arguments

    add_placement_arguments(p)


def _parse_data(items: list[str]) -> dict[str, str]:
    from tunelab.errors import TunelabError
    from tunelab.eval.userdata import read_jsonl

    data = {}
    for item in items:
        suite, sep, path = item.partition("=")
        if not sep or suite not in SUITE_CHOICES[:-1]:
            raise TunelabError(f"--data {item!r}: write SUITE=FILE.jsonl with SUITE one of {', '.join(SUITE_CHOICES[:-1])}")
        read_jsonl(path, suite)  # check every file now, not after the suites before it have run
        data[suite] = path
    return data


def _is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and ((path / "adapter").is_dir() or (path / "model").is_dir())


def _tuned_from_run(run: Path, base_model, dtype, device, kernels: str):
    """The run's tuned model: its model/ folder, or the base with the run's method (e.g. 4-bit + LoRA) and adapter;
    with the speed-ups of `kernels` (--kernels), as the base model got them."""
    from tunelab.accel.kernels import choose
    from tunelab.config import load_config
    from tunelab.export.resolve import with_kernels
    from tunelab.models.load import load_pretrained

    if (run / "model").is_dir():
        return with_kernels(load_pretrained(str(run / "model"), dtype)[0].to(device), kernels, device)
    from tunelab.lora import load_adapter
    from tunelab.train.run import prepare_method

    # quantize (qlora), add empty LoRA layers, and attach the speed-ups to the new layers too
    prepare_method(base_model, load_config(run / "config.yaml"), choose(base_model, kernels, device))
    return load_adapter(base_model, run / "adapter", verbose=False).to(device)


def _check_adapter_files(folder: Path) -> None:
    """A readable adapter config and safetensors header (no tensors read), so a broken run fails at once."""
    from tunelab.errors import TunelabError
    from tunelab.lora.peft_format import WEIGHTS_NAME, read_adapter_config
    from tunelab.models.load import safetensors_keys

    read_adapter_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise TunelabError(f"{folder} has no {WEIGHTS_NAME} (tunelab reads safetensors adapters only)")
    safetensors_keys(weights, "save the adapter again")


INTERVAL_NOTE = ("Intervals are 95%: Wilson score intervals for 0/1 outcomes (exact match, attack success, "
                 "abstention and the other rates), percentile bootstrap over items (2000 resamples) for "
                 "partial-credit scores. " + BASELINE_NOTE)


def _training_data_notes(data_cfg, suites: list[str], args, data: dict) -> tuple[set[str] | None, list[str]]:
    """Read the run's training data once: the prompts to drop from the task items, and report lines on how
    much of the built-in held-out ppl text the run trained on. (None, [warning]) when it cannot be read."""
    from tunelab.errors import DataError
    from tunelab.eval.heldout import scan_training_data
    from tunelab.eval.suites import builtin_ppl_sources

    texts = builtin_ppl_sources(args.n, args.seed) if "ppl" in suites and "ppl" not in data else {}
    if "tasks" not in suites and not texts:
        return None, []
    try:
        scan = scan_training_data(data_cfg, texts)
    except DataError as e:
        line = (f"WARNING: the run's training data cannot be read ({e}): training prompts were NOT removed "
                "from the task items and the ppl text was NOT checked against it.")
        print(f"tunelab eval: {line}")
        return None, [line]
    notes = [f"Held-out check of the ppl text: {scan.overlap_line(name)}." for name in texts]
    for line in notes:
        print(f"tunelab eval: {line}")
    return scan.prompts, notes


def run(args) -> int:
    import torch

    from tunelab.errors import TunelabError
    from tunelab.eval.report import write_report
    from tunelab.eval.suites import SUITES, run_suites
    from tunelab.models.load import load_pretrained

    suites = list(SUITES) if "all" in (args.suite or []) else list(dict.fromkeys(args.suite or ["tasks"]))
    for flag, value in (("--n", args.n), ("--batch-size", args.batch_size)):
        if value < 1:
            raise TunelabError(f"{flag} must be 1 or more, got {value}")
    data = _parse_data(args.data)
    src = Path(args.source)
    run_dir = src if _is_run(src) else None
    if run_dir is not None and args.adapter:
        raise TunelabError(f"{src} is a run folder (it has its own adapter or model); drop --adapter")
    if args.skip_base and run_dir is None and not args.adapter:
        raise TunelabError("--skip-base needs a run folder or --adapter (otherwise there is nothing left to evaluate)")
    notes = []
    exclude = None
    if run_dir is not None:
        from tunelab.config import load_config

        run_cfg = load_config(run_dir / "config.yaml")
        base_source = run_cfg.model.source
        exclude, notes = _training_data_notes(run_cfg.data, suites, args, data)
        if not (run_dir / "model").is_dir():  # its adapter loads after the base is scored: check its files now
            _check_adapter_files(run_dir / "adapter")
    else:
        base_source = args.source
        if "tasks" in suites:
            notes = ["Not a run folder: what the model was tuned on is unknown, so no task items were removed."]
    out = Path(args.out) if args.out else (run_dir / "eval" if run_dir else Path("eval-report"))
    if out.exists() and not out.is_dir():
        raise TunelabError(f"--out {out} is a file; give a folder for the report")
    from tunelab.export.resolve import pick_device, pick_dtype

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    torch.manual_seed(0)
    model, tok = load_pretrained(base_source, dtype)
    model.to(device)
    if args.adapter:  # load it first: a bad adapter fails now, not after the base model's evaluation
        from tunelab.lora import load_adapter

        load_adapter(model, args.adapter, verbose=False).to(device)
    from tunelab.export.resolve import with_kernels

    with_kernels(model, args.kernels, device)  # base and tuned get the same speed-ups (--kernels)

    def evaluate(label: str, m) -> dict:
        print(f"tunelab eval: {label}: suites {', '.join(suites)}")
        return run_suites(m, tok, suites, args.n, args.seed, args.batch_size, data, exclude, args.collection)

    results = {}
    if not args.skip_base:
        from tunelab.lora import disable_adapters

        with disable_adapters(model):  # the base output exactly (a no-op without an adapter)
            results["base"] = evaluate("base", model)
    if run_dir is not None:
        results["tuned"] = evaluate("tuned", _tuned_from_run(run_dir, model, dtype, device, args.kernels))
    elif args.adapter:
        results["tuned"] = evaluate("tuned", model)
    tuned_from = f"; tuned: {run_dir or args.adapter}" if "tuned" in results else ""
    tasks = next((r["tasks"]["detail"] for r in results.values() if "tasks" in r), None)
    if tasks is not None and exclude is not None:
        line = (f"Removed {tasks['removed']} of {tasks['removed'] + tasks['items']} task items: their prompt is one "
                f"of the run's {len(exclude)} training prompts.")
        print(f"tunelab eval: {line}")
        notes.insert(0, line)
    notes = [f"Command: `tunelab eval {' '.join(_argv(args))}`",
             f"Base model: {base_source}{tuned_from}. Seed {args.seed}, n={args.n}, greedy decoding."
             + ("" if args.collection == "quickstart" else f" Task collection: {args.collection}."), *notes,
             INTERVAL_NOTE]
    path = write_report(results, out, f"tunelab eval: {', '.join(suites)}", notes)
    print(path.read_text())
    print(f"tunelab eval: wrote {path}, {out / 'report.html'}, {out / 'report.png'}, {out / 'results.json'}")
    return 0


def _argv(args) -> list[str]:
    """The command line back from parsed args (for the report)."""
    parts = [args.source] + [f"--suite {s}" for s in args.suite or []]
    parts += [f"--{k.replace('_', '-')} {v}" for k, v in (("adapter", args.adapter), ("n", args.n), ("seed", args.seed),
                                                          ("batch_size", args.batch_size), ("out", args.out),
                                                          ("collection", args.collection != "quickstart" and args.collection),
                                                          ("device", args.device), ("dtype", args.dtype)) if v]
    parts += [f"--data {d}" for d in args.data] + (["--skip-base"] if args.skip_base else [])
    return parts
