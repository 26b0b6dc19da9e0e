"""Span detection: mark the injected tokens in a document, the seed of a guard in front of a model.

A causal LM becomes a token classifier (`LlamaForTokenClassification`-style: the LM body plus a linear
`score` head, 2 labels: 0 = document, 1 = injected). LoRA adapts the body; the new head trains in full as
a `modules_to_save` module. Training data are injection items (tunelab.eval.injection) of the train styles
with their character spans turned into token labels; evaluation uses the held-out styles.

Metrics: token-level precision / recall / F1 of label 1, and span-level ones where a span is a maximal run
of 1s and a predicted span matches a gold span when their token IoU is >= 0.5 (each gold span matched once).
"""

from __future__ import annotations

import itertools
import math
import time

import torch
import torch.nn.functional as F

from tunelab.eval.tasks import Item


def token_labels(tokenizer, item: Item, max_len: int = 384) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of an item's prompt: label 1 on every token overlapping meta["span"]."""
    enc = tokenizer(item.prompt, add_special_tokens=False, return_offsets_mapping=True,
                    truncation=True, max_length=max_len)
    span = item.meta.get("span")
    labels = [int(span is not None and a < span[1] and b > span[0]) for a, b in enc["offset_mapping"]]
    return enc["input_ids"], labels


def runs(labels: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of label 1 as [start, end) token ranges."""
    out, start = [], None
    for i, v in enumerate(list(labels) + [0]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i))
            start = None
    return out


def close_gaps(labels: list[int], gap: int) -> list[int]:
    """Fill runs of <= `gap` zeros between two 1s: one missed token inside an injection should not split it
    into two spans (the decoding a guard would use before cutting spans out)."""
    out = list(labels)
    spans = runs(labels)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start - end <= gap:
            out[end:start] = [1] * (start - end)
    return out


def _prf(tp: int, n_pred: int, n_gold: int) -> dict:
    p = tp / n_pred if n_pred else (1.0 if n_gold == 0 else 0.0)
    r = tp / n_gold if n_gold else (1.0 if n_pred == 0 else 0.0)
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def span_metrics(pred: list[list[int]], gold: list[list[int]], iou: float = 0.5) -> dict:
    """{"token": P/R/F1 of label 1 over all tokens, "span": P/R/F1 of runs matched at IoU >= iou}."""
    tp = n_pred = n_gold = 0
    s_tp = s_pred = s_gold = 0
    for p, g in zip(pred, gold, strict=True):
        tp += sum(a and b for a, b in zip(p, g, strict=True))
        n_pred, n_gold = n_pred + sum(p), n_gold + sum(g)
        ps, gs = runs(p), runs(g)
        s_pred, s_gold = s_pred + len(ps), s_gold + len(gs)
        unmatched = list(gs)
        for a, b in ps:
            for gspan in unmatched:
                inter = max(0, min(b, gspan[1]) - max(a, gspan[0]))
                if inter / (max(b, gspan[1]) - min(a, gspan[0])) >= iou:
                    unmatched.remove(gspan)
                    s_tp += 1
                    break
    return {"token": _prf(tp, n_pred, n_gold), "span": _prf(s_tp, s_pred, s_gold)}


def token_classifier(folder, lora_r: int = 8, lora_alpha: float = 16.0, seed: int = 0, layers: int | None = None):
    """A 2-label token classifier from a causal-LM folder, with LoRA on every linear and a trainable head.

    `layers` keeps only the first k transformer layers (a cheaper guard: spotting an instruction that does
    not belong to a document needs less depth than answering); None keeps them all.
    """
    from transformers import AutoModelForTokenClassification

    from tunelab.lora import LoraConfig, apply_lora

    torch.manual_seed(seed)  # the new `score` head is initialised randomly
    extra = {"num_hidden_layers": layers} if layers else {}
    model = AutoModelForTokenClassification.from_pretrained(folder, num_labels=2, dtype=torch.float32, **extra)
    cfg = LoraConfig(r=lora_r, alpha=lora_alpha, target_modules="all-linear", modules_to_save=["score"])
    return apply_lora(model, cfg, verbose=False)


def _batch(rows: list[tuple[list[int], list[int]]], pad_id: int):
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (i, lab) in enumerate(rows):
        ids[r, :len(i)], labels[r, :len(i)], mask[r, :len(i)] = torch.tensor(i), torch.tensor(lab), 1
    return ids, labels, mask


def train_detector(model, tokenizer, items: list[Item], steps: int = 100, batch_size: int = 8, lr: float = 1e-3,
                   seed: int = 0, log_every: int = 10) -> list[float]:
    """AdamW on the trainable (LoRA + head) parameters, cycling through `items` in a seeded order; returns losses."""
    rows = [token_labels(tokenizer, it) for it in items]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        batch = [rows[order[(step * batch_size + j) % len(rows)]] for j in range(batch_size)]
        ids, labels, mask = _batch(batch, pad)
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, 2)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"span detector step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return losses


@torch.no_grad()
def predict(model, tokenizer, items: list[Item], batch_size: int = 16) -> list[list[int]]:
    """Predicted 0/1 label per token of each item's prompt (argmax)."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [token_labels(tokenizer, it) for it in items]
    out = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        ids, _, mask = _batch(batch, pad)
        pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)  # (B, T)
        out += [pred[r, :len(i)].tolist() for r, (i, _) in enumerate(batch)]
    return out


def evaluate_detector(model, tokenizer, items: list[Item], batch_size: int = 16) -> dict:
    """span_metrics of the detector on items (clean items included: any mark on them is a false positive)."""
    t0 = time.perf_counter()
    pred = predict(model, tokenizer, items, batch_size)
    seconds = time.perf_counter() - t0
    gold = [token_labels(tokenizer, it)[1] for it in items]
    return {**span_metrics(pred, gold), "items_per_s": len(items) / seconds, "n": len(items)}


# ---- span detection as a training task (data.task: spans): BIO labels, several span labels, windows ----
#
# Spans are (start, end, k) token ranges [start, end) of label index k; tag ids are tunelab.data.spans'
# (0 = O, 1 + 2k = B, 2 + 2k = I). Matching rule: a predicted span is correct when its label and both token
# boundaries equal a gold span's (exact match); token metrics count the tokens inside spans, per label.

POSTPROCESS_GRID = {"snap": ("off", "words"), "gap": (0, 1, 2, 3, 5), "min_len": (1, 2, 3)}
NO_POSTPROCESS = {"gap": 0, "min_len": 1, "snap": "off"}


def decode(tags: list[int]) -> list[tuple[int, int, int]]:
    """Token spans of a BIO tag-id sequence: B-k opens a span, I-k extends an open span of k (an I-k after
    O or another label opens one: an argmax decoder may miss the B)."""
    out, cur = [], None  # cur: [start, end, k]
    for i, t in enumerate(tags):
        k, inside = (t - 1) // 2, t % 2 == 0
        if t and inside and cur and cur[2] == k and cur[1] == i:
            cur[1] = i + 1
            continue
        if cur:
            out.append(tuple(cur))
        cur = [i, i + 1, k] if t else None
    if cur:
        out.append(tuple(cur))
    return out


def postprocess(spans: list[tuple[int, int, int]], gap: int = 0, min_len: int = 1) -> list[tuple[int, int, int]]:
    """Join spans of one label separated by <= gap tokens, then drop spans shorter than min_len tokens."""
    joined: list[list[int]] = []
    for a, b, k in sorted(spans, key=lambda s: (s[2], s[0])):
        if joined and joined[-1][2] == k and a - joined[-1][1] <= gap:
            joined[-1][1] = max(joined[-1][1], b)
        else:
            joined.append([a, b, k])
    return sorted((a, b, k) for a, b, k in joined if b - a >= min_len)


# snap="words": punctuation dropped from a snapped span's ends, and the bracket pairs whose half alone is dropped
END_PUNCT, EDGE_QUOTES, BRACKETS = ",.;:!?", "\"'", {"(": ")", "[": "]", "{": "}", "<": ">"}


def snap_chars(text: str, start: int, end: int) -> tuple[int, int]:
    """[start, end) snapped to words: whitespace at the ends dropped; then extended to cover every
    whitespace-delimited word it touches; then, repeatedly, from the end one of , . ; : ! ? or a quote, from
    the start a quote, a closing bracket at the end whose kind has more closers than openers in the span (an
    opener at the start: more openers), and an opener at the start paired with the same kind's closer at the
    end. `(555) 123-4567.` -> `(555) 123-4567`; `(ann@x.com),` -> `ann@x.com`. May return start == end."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if start == end:
        return start, end
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    while end < len(text) and not text[end].isspace():
        end += 1
    closer = {c: o for o, c in BRACKETS.items()}
    while start < end:
        first, last, n = text[start], text[end - 1], text.count
        if last in END_PUNCT + EDGE_QUOTES or (last in closer and n(closer[last], start, end) < n(last, start, end)):
            end -= 1
        elif first in EDGE_QUOTES or (first in BRACKETS and n(first, start, end) > n(BRACKETS[first], start, end)):
            start += 1
        elif end - start > 1 and first in BRACKETS and last == BRACKETS[first]:
            start, end = start + 1, end - 1
        else:
            break
    return start, end


def snap_words(spans: list[tuple[int, int, int]], text: str, offsets) -> list[tuple[int, int, int]]:
    """Token spans snapped to words (snap_chars on their characters), then back to the tokens whose
    characters overlap the snapped range (tunelab.data.spans.token_tags' rule for gold spans); a span left
    with no characters is dropped, and spans of one label that now overlap (pieces of one word) are joined;
    spans that only touch stay apart."""
    out = []
    for a, b, k in spans:
        start, end = snap_chars(text, offsets[a][0], offsets[b - 1][1])
        covered = [i for i, (s, e) in enumerate(offsets) if s < end and e > start]
        if start < end and covered:
            out.append((covered[0], covered[-1] + 1, k))
    return postprocess(out, gap=-1)  # gap -1: join spans that share a token


def bio_metrics(pred: list[list[tuple]], gold: list[list[tuple]], labels: list[str], intervals: bool = False) -> dict:
    """{label: {"token": P/R/F1, "span": P/R/F1}} per label and under "micro" (all labels pooled), over
    documents given as lists of (start, end, k) token spans; span matching is exact (label and boundaries).
    `intervals`: also "span_interval" {precision, recall, f1: (lo, hi)} per label, 95%: Wilson for precision
    (matched of predicted spans) and recall (matched of gold spans), a bootstrap over documents for F1."""
    # per document and label: token tp, pred, gold; span tp, pred, gold
    counts = torch.zeros(len(gold), len(labels), 6, dtype=torch.long)
    for d, (p, g) in enumerate(zip(pred, gold, strict=True)):
        for k in range(len(labels)):
            pt = {i for a, b, j in p if j == k for i in range(a, b)}
            gt = {i for a, b, j in g if j == k for i in range(a, b)}
            ps, gs = {s for s in p if s[2] == k}, {s for s in g if s[2] == k}
            counts[d, k] = torch.tensor((len(pt & gt), len(pt), len(gt), len(ps & gs), len(ps), len(gs)))
    per_label = {labels[k]: counts[:, k] for k in range(len(labels))}
    per_label["micro"] = counts.sum(1)  # (docs, 6)
    out = {}
    for name, c in per_label.items():
        tot = c.sum(0).tolist()
        out[name] = {"token": _prf(*tot[:3]), "span": _prf(*tot[3:])}
        if intervals:
            out[name]["span_interval"] = _span_intervals(c[:, 3:])
    return out


def _span_intervals(c: torch.Tensor, resamples: int = 2000, seed: int = 0) -> dict:
    """95% intervals of span P, R (Wilson) and F1 (percentile bootstrap over documents) from per-document
    (matched, predicted, gold) span counts c (docs, 3); None where a rate has no denominator."""
    from tunelab.eval.stats import wilson_interval

    tp, n_pred, n_gold = c.sum(0).tolist()
    g = torch.Generator().manual_seed(seed)
    sums = c[torch.randint(0, len(c), (resamples, len(c)), generator=g)].sum(1).double()  # (resamples, 3)
    both = sums[:, 1] + sums[:, 2]
    f1 = torch.where(both > 0, 2 * sums[:, 0] / both.clamp(min=1), 1.0).sort().values  # _prf's F1: 2 tp / (pred + gold)
    lo, hi = math.floor(0.025 * (resamples - 1)), math.ceil(0.975 * (resamples - 1))  # as stats.bootstrap_interval
    return {"precision": wilson_interval(tp, n_pred) if n_pred else None,
            "recall": wilson_interval(tp, n_gold) if n_gold else None,
            "f1": (f1[lo].item(), f1[hi].item()) if len(c) else None}


@torch.no_grad()
def predict_docs(model, tokenizer, texts: list[str], seq_len: int, stride: int, batch_size: int = 8):
    """For each text: (offsets, probs) with probs (tokens, tags) float32 on CPU, each token's from the first
    window that covers it (tunelab.data.spans.windows)."""
    from tunelab.data.spans import windows

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    docs, jobs = [], []  # jobs: (doc, window start, first kept, end)
    for d, text in enumerate(texts):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        docs.append((enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]))
        jobs += [(d, a, first, b) for a, b, first in windows(len(enc["input_ids"]), seq_len, stride) if b > a]
    probs = [torch.zeros(len(ids), len(model.config.id2label)) for ids, _ in docs]
    for i in range(0, len(jobs), batch_size):
        part = jobs[i:i + batch_size]
        rows = [(docs[d][0][a:b], [0] * (b - a)) for d, a, _, b in part]
        ids, _, mask = _batch(rows, pad)
        p = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().softmax(-1).cpu()
        for r, (d, a, first, b) in enumerate(part):
            probs[d][first:b] = p[r, first - a:b - a]
    model.train(was_training)
    return [(offsets, pr) for (_, offsets), pr in zip(docs, probs)]


def label_settings(post: dict | list | None, labels: list[str]) -> list[dict]:
    """The {gap, min_len, snap} of each label index. `post` is a spans.json "postprocess": its "labels" entry
    (chosen per label) where it names the label, else its own gap/min_len/snap (the pooled choice, and all a
    run made before per-label choice has; a run made before snapping reads as snap off); or already a list."""
    if isinstance(post, list):
        return post
    post = post or {}
    pooled = {**NO_POSTPROCESS, **{k: post[k] for k in NO_POSTPROCESS if k in post}}
    per_label = post.get("labels") or {}
    return [{**pooled, **per_label.get(label, {})} for label in labels]


def scored_spans(probs: torch.Tensor, post: dict | list | None = None, text: str = "", offsets=()) -> list[tuple]:
    """(start, end, k, score) token spans of argmax tags after post-processing, label by label: gaps closed,
    then snapped to words (snap "words", snap_words: needs the document's text and token offsets), then the
    spans shorter than min_len tokens dropped; score = the mean probability of label k (B or I) over the
    span's tokens. `post`: one {gap, min_len, snap} for every label, or a list of them by label index
    (label_settings)."""
    n_labels = (probs.shape[-1] - 1) // 2  # tags: O, then B/I per label
    settings = post if isinstance(post, list) else [{**NO_POSTPROCESS, **(post or {})}] * n_labels
    decoded, spans = decode(probs.argmax(-1).tolist()), []
    for k, s in enumerate(settings):
        mine = postprocess([sp for sp in decoded if sp[2] == k], s["gap"])
        if s["snap"] == "words":
            mine = snap_words(mine, text, offsets)
        elif s["snap"] != "off":
            raise ValueError(f"postprocess snap={s['snap']!r}: use one of {POSTPROCESS_GRID['snap']}")
        spans += [sp for sp in mine if sp[1] - sp[0] >= s["min_len"]]
    return [(a, b, k, float((probs[a:b, 1 + 2 * k] + probs[a:b, 2 + 2 * k]).mean())) for a, b, k in sorted(spans)]


def scored_metrics(docs: list[tuple], gold: list[list[tuple]], labels: list[str], post: dict | list | None = None,
                   intervals: bool = False) -> dict:
    """bio_metrics of the argmax spans of predicted documents (text, offsets, probs (tokens, tags)), raw or
    after post-processing (one {gap, min_len, snap}, or a spans.json "postprocess" with per-label choices)."""
    settings = label_settings(post, labels)
    pred = [[s[:3] for s in scored_spans(p, settings, text, offsets)] for text, offsets, p in docs]
    return bio_metrics(pred, gold, labels, intervals)


POSTPROCESS_CHOICES = ("per-label", "pooled")


def choose_postprocess(docs: list[tuple], gold: list[list[tuple]], labels: list[str], by: str = "per-label") -> dict:
    """Post-processing chosen on these (validation) documents ((text, offsets, probs) each) over POSTPROCESS_GRID:
    {gap, min_len, snap: the setting with the best micro span F1 (pooled), "by", "labels": {label: setting}}.
    by "per-label": each label gets the setting with its own best span F1 (labels are post-processed
    independently, so the choices do not interact); a label with no gold span in these documents has nothing
    to choose on and takes the pooled setting. by "pooled": every label the pooled setting. Ties go to the
    smallest change (the grid's order: no snapping first)."""
    if by not in POSTPROCESS_CHOICES:
        raise ValueError(f"postprocess choice {by!r}: use one of {POSTPROCESS_CHOICES}")
    grid = [dict(zip(POSTPROCESS_GRID, v)) for v in itertools.product(*POSTPROCESS_GRID.values())]
    scores = [scored_metrics(docs, gold, labels, post) for post in grid]

    def best(name: str) -> dict:
        return grid[max(range(len(grid)), key=lambda i: (scores[i][name]["span"]["f1"], -i))]

    pooled = best("micro")
    has_gold = {labels[k] for spans in gold for *_, k in spans}
    chosen = {label: best(label) if by == "per-label" and label in has_gold else pooled for label in labels}
    return {**pooled, "by": by, "labels": chosen}


def predict_gold(model, tokenizer, docs, labels: list[str], seq_len: int, stride: int):
    """(predicted, gold token spans) of span docs (tunelab.data.spans.SpanDoc), predicted as (text, offsets,
    probs) per document, for scored_metrics."""
    from tunelab.data.spans import encode_doc

    texts = [d.text for d in docs]
    predicted = [(t, *op) for t, op in zip(texts, predict_docs(model, tokenizer, texts, seq_len, stride))]
    return predicted, [decode(encode_doc(d, tokenizer, labels, seq_len, stride)[2]) for d in docs]


def char_spans(text: str, offsets, spans, labels: list[str], snap: str | list[str] = "off") -> list[dict]:
    """Token spans as {"start", "end", "label", "score", "text"} character spans (leading spaces trimmed;
    snap "words": the characters snap_chars keeps of them, e.g. not a period that shares a token). `snap`: one
    for every label, or a list by label index."""
    snaps = snap if isinstance(snap, list) else [snap] * len(labels)
    out = []
    for a, b, k, score in spans:
        start, end = offsets[a][0], offsets[b - 1][1]
        while start < end and text[start].isspace():
            start += 1
        if snaps[k] == "words":
            start, end = snap_chars(text, start, end)
        out.append({"start": start, "end": end, "label": labels[k], "score": round(score, 4), "text": text[start:end]})
    return out


def redact(text: str, spans: list[dict]) -> str:
    """The text with every detected span replaced by [LABEL]. Spans that overlap (of different labels: snapping
    to words or closing gaps can make them) become one mask, with the label of the first (earliest, then
    longest), so no mask ever eats the characters after a span."""
    masks: list[list] = []  # [start, end, label], disjoint, by start
    for s in sorted(spans, key=lambda s: (s["start"], -s["end"])):
        if masks and s["start"] < masks[-1][1]:
            masks[-1][1] = max(masks[-1][1], s["end"])
        else:
            masks.append([s["start"], s["end"], s["label"]])
    for start, end, label in reversed(masks):
        text = text[:start] + f"[{label.upper()}]" + text[end:]
    return text


def detect(model, tokenizer, texts: list[str], labels: list[str], seq_len: int, stride: int,
           post: dict | list | None = None) -> list[list[dict]]:
    """The detected spans of each text (char_spans' dicts), with the post-processing: one {gap, min_len, snap},
    or a run's spans.json "postprocess" (each label its own setting where chosen per label)."""
    settings = label_settings(post, labels)
    snaps = [s["snap"] for s in settings]
    return [char_spans(text, offsets, scored_spans(p, settings, text, offsets), labels, snaps)
            for text, (offsets, p) in zip(texts, predict_docs(model, tokenizer, texts, seq_len, stride))]


# A baseline to beat: every line that holds one of these words (lower case, English phrasings of injected
# instructions, chosen before looking at any prediction) is marked as one span, label 0.
KEYWORDS = ("ignore", "disregard", "instruction", "assistant", "system", "reply", "respond", "print", "output")


def keyword_spans(text: str, keywords=KEYWORDS) -> list[tuple[int, int]]:
    """(start, end) character spans of the stripped lines of `text` containing a keyword."""
    out, pos = [], 0
    for line in text.split("\n"):
        if any(k in line.lower() for k in keywords) and line.strip():
            lead = len(line) - len(line.lstrip())
            out.append((pos + lead, pos + len(line.rstrip())))
        pos += len(line) + 1
    return out
