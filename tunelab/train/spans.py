"""data.task=spans in a run: the token classifier, its objective with span metrics, the final scores, and
opening a trained run again (tunelab detect).

After training, the post-processing (tunelab.eval.spans.POSTPROCESS_GRID: snapping to words, gap closing,
minimum length) is chosen on the validation split, per label by default (data.postprocess), and then applied
unchanged to the test split (data.test_path); both splits are reported raw and post-processed. The run folder's spans.json keeps what detection needs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tunelab.data import spans as data_spans
from tunelab.eval import spans as eval_spans
from tunelab.models.token_cls import HEAD, from_causal_lm
from tunelab.train.loss import TOKEN_CLASSIFICATION

INFO = "spans.json"


def with_head(cfg):
    """cfg with the head in lora.modules_to_save (trained in full, saved with the adapter)."""
    keep = list(dict.fromkeys((cfg.lora.modules_to_save or []) + [HEAD]))
    return cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"modules_to_save": keep})})


class SpanTask:
    """The documents and labels of a spans run, read once."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.train, self.val, self.test = data_spans.split_docs(cfg.data, cfg.train.seed)
        self.labels = data_spans.label_list(cfg.data, self.train + self.val + self.test)

    def model(self, lm):
        return from_causal_lm(lm, self.labels, self.cfg.model.keep_layers)

    def _predict(self, model, tok, docs):
        return eval_spans.predict_gold(model, tok, docs, self.labels, self.cfg.train.seq_len, self.cfg.data.stride)

    def objective(self, tok):
        """Token cross-entropy; at every evaluation the raw (not post-processed) validation metrics."""
        def metrics(model) -> dict:
            if not self.val:
                return {}
            m = eval_spans.scored_metrics(*self._predict(model, tok, self.val), self.labels)
            return {"eval_token_f1": m["micro"]["token"]["f1"], "eval_span_f1": m["micro"]["span"]["f1"],
                    "eval_spans": m}

        return dataclasses.replace(TOKEN_CLASSIFICATION, metrics=metrics)

    def scores(self, model, tok, by: str | None = None) -> dict:
        """Validation raw -> post-processing chosen there (per label or pooled: `by`, else data.postprocess) ->
        validation and test with it (with intervals). The test split is predicted only after the choice."""
        result = {"labels": self.labels, "seq_len": self.cfg.train.seq_len, "stride": self.cfg.data.stride,
                  "matching": MATCHING,
                  "postprocess": {**eval_spans.NO_POSTPROCESS, "chosen_on": None}}
        if not self.val:
            return result
        predicted = {"validation": self._predict(model, tok, self.val)}
        post = eval_spans.choose_postprocess(*predicted["validation"], self.labels, by or self.cfg.data.postprocess)
        result["postprocess"] = {**post, "chosen_on": f"validation ({len(self.val)} documents)"}
        if self.test:
            predicted["test"] = self._predict(model, tok, self.test)
        for split, (docs, gold) in predicted.items():
            result[split] = {"raw": eval_spans.scored_metrics(docs, gold, self.labels, intervals=True),
                             "post": eval_spans.scored_metrics(docs, gold, self.labels, post, intervals=True),
                             "documents": len(gold)}
        return result

    def final(self, model, tok, out: Path, step: int) -> dict:
        """scores(), written to spans.json and appended to metrics.jsonl."""
        result = self.scores(model, tok)
        (out / INFO).write_text(json.dumps(result, indent=1))
        print(table(result))
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "spans": result}) + "\n")
        return result


def _with_interval(m: dict, key: str) -> str:
    ci = (m.get("span_interval") or {}).get(key)
    return f"{m['span'][key]:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def describe_postprocess(post: dict, labels: list[str]) -> str:
    """One line: each label's post-processing setting and where it was chosen."""
    def one(p: dict) -> str:
        return f"close gaps <= {p['gap']} tokens, snap to words {p['snap']}, min length {p['min_len']} tokens"

    settings = eval_spans.label_settings(post, labels)
    if len(labels) == 1 or all(p == settings[0] for p in settings):
        what = one(settings[0])
    else:
        what = "; ".join(f"{label}: {one(p)}" for label, p in zip(labels, settings))
    by = f"chosen {post['by'].replace('-', ' ')} on" if post.get("by") else "chosen on"
    return f"post-processing: {what} ({by} {post['chosen_on']})"


def table(info: dict) -> str:
    """A Markdown table of a spans.json: token and span P/R/F1 per label and split, raw and post-processed
    (span rates with their 95% intervals where recorded)."""
    lines = [f"{describe_postprocess(info['postprocess'], info['labels'])}; span match: {info['matching']}; [95% "
             "intervals: Wilson for P and R, bootstrap over documents for F1]", "",
             "| split | decoding | label | token P | token R | token F1 | span P | span R | span F1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for split in ("validation", "test"):
        for decoding in ("raw", "post"):
            for label, m in info.get(split, {}).get(decoding, {}).items():
                if label == "micro" and len(info["labels"]) == 1:
                    continue  # the same numbers as the one label's
                t = m["token"]
                lines.append(f"| {split} | {decoding} | {label} | {t['precision']:.3f} | {t['recall']:.3f} | "
                             f"{t['f1']:.3f} | " + " | ".join(_with_interval(m, k) for k in ("precision", "recall", "f1"))
                             + " |")
    return "\n".join(lines)


def open_detector(run: str | Path):
    """(model, tokenizer, info) of a trained spans run folder: base (re-quantized for qlora) + cut body +
    the adapter with its head."""
    import torch

    from tunelab.config import load_config
    from tunelab.errors import TunelabError
    from tunelab.lora import load_adapter
    from tunelab.train.run import build_model

    run = Path(run)
    if not (run / INFO).is_file() or not (run / "adapter").is_dir():
        raise TunelabError(f"{run}: not a finished spans run (no {INFO} or adapter/); train one with data.task=spans")
    cfg = load_config(run / "config.yaml")
    info = json.loads((run / INFO).read_text())
    lm, tok = build_model(cfg, torch.device("cpu"))
    model = from_causal_lm(lm, info["labels"], cfg.model.keep_layers)
    load_adapter(model, run / "adapter", verbose=False)
    return model.eval(), tok, info


def checkpoint_detector(run: str | Path, checkpoint: str | Path):
    """(model, tokenizer) of a spans run at one of its checkpoints (checkpoints/step-N: the trainable LoRA and
    head weights by name), e.g. to score a run stopped before its end."""
    import torch
    from safetensors.torch import load_file

    from tunelab.config import load_config
    from tunelab.errors import TunelabError
    from tunelab.train.run import build_model, prepare_method

    cfg = with_head(load_config(Path(run) / "config.yaml"))
    lm, tok = build_model(cfg, torch.device("cpu"))
    model = SpanTask(cfg).model(lm)
    prepare_method(model, cfg)
    weights = load_file(Path(checkpoint) / "weights.safetensors")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != trainable:
        raise TunelabError(f"{checkpoint}: its weights are not this run's trainable parameters")
    model.load_state_dict(weights, strict=False)
    return model.eval(), tok


BASELINES = {"keyword": "every line holding a word of tunelab.eval.spans.KEYWORDS, as the run's first label",
             "regex": "the regular expressions of tunelab.data.pii.PATTERNS, one label each"}


def _baseline_spans(kind: str, text: str, labels: list[str]) -> list[tuple[int, int, str]]:
    if kind == "keyword":
        return [(a, b, labels[0]) for a, b in eval_spans.keyword_spans(text)]
    from tunelab.data.pii import regex_spans

    return [s for s in regex_spans(text) if s[2] in labels]


def baseline(run: str | Path, kind: str = "keyword") -> dict:
    """eval_spans.bio_metrics (with intervals) of a rule baseline (BASELINES) on the run's validation and test
    documents, in the run's tokens."""
    from tunelab.config import load_config
    from tunelab.train.run import early_tokenizer

    cfg = load_config(Path(run) / "config.yaml")
    task, tok = SpanTask(cfg), early_tokenizer(cfg)
    out = {}
    for split, docs in (("validation", task.val), ("test", task.test)):
        pred, gold = [], []
        for d in docs:
            offsets, tags = data_spans.encode_doc(d, tok, task.labels, cfg.train.seq_len, cfg.data.stride)[1:3]
            marked = _baseline_spans(kind, d.text, task.labels)
            pred.append(eval_spans.decode(data_spans.token_tags(offsets, marked, task.labels)))
            gold.append(eval_spans.decode(tags))
        if docs:
            out[split] = {"raw": eval_spans.bio_metrics(pred, gold, task.labels, intervals=True), "documents": len(docs)}
    return out


MATCHING = "exact: same label, same first and last token"


if __name__ == "__main__":  # python -m tunelab.train.spans RUN [--keyword-baseline | --regex-baseline | --rescore [CKPT] [--pooled] [--write]]
    import sys

    from tunelab.config import load_config

    run, rest = sys.argv[1], sys.argv[2:]
    kind = next((k for k in BASELINES if f"--{k}-baseline" in rest), None)
    if kind:
        info = {"labels": SpanTask(load_config(Path(run) / "config.yaml")).labels, "matching": MATCHING,
                **baseline(run, kind),
                "postprocess": {**eval_spans.NO_POSTPROCESS, "chosen_on": f"nothing: {BASELINES[kind]}, as marked"}}
    elif "--rescore" in rest:  # the run's detector (or its weights at checkpoints/step-N) scored by this code
        at = [a for a in rest[rest.index("--rescore") + 1:][:1] if not a.startswith("--")]
        detector, tok = checkpoint_detector(run, at[0]) if at else open_detector(run)[:2]
        by = "pooled" if "--pooled" in rest else None  # else the run's data.postprocess (per-label by default)
        info = SpanTask(load_config(Path(run) / "config.yaml")).scores(detector, tok, by)
        if "--write" in rest and not at:  # the finished run's spans.json (what detect and --guard read) replaced
            (Path(run) / INFO).write_text(json.dumps(info, indent=1))
    else:
        info = json.loads((Path(run) / INFO).read_text())
    print(table(info))
