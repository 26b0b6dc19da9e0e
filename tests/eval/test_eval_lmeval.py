"""The `tunelab` lm-eval model class on local tasks (JSONL + task YAML written here), against scores
computed directly from the transformers model in float64, one sequence at a time without padding."""

from __future__ import annotations

import json

import lm_eval  # noqa: E402,F401  (in the test extras; the integration is the optional extra tunelab[lmeval])
import pytest
import torch

from tests.support.eval_fixtures import one_thread  # noqa: F401  (autouse: 1 torch thread)

QUESTIONS = [
    {"question": "The class statement", "choices": [" defines", " is", " of the"], "gold": 0},
    {"question": "Return the value of x", "choices": [" here", " in the expression below"], "gold": 1},
    {"question": "A", "choices": [" b", " c", " longer answer text"], "gold": 2},
]
TEXTS = ["The try statement specifies exception handlers and/or cleanup code for a group of statements.",
         "Names refer to objects.", "x"]
PROMPTS = ["The class statement", "Return the value", "Operators in Python", "a b c d e f g h"]


def _logp64(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """log p(cont | ctx) (log-softmax in float64) and whether every cont token is the argmax, one unpadded sequence."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, len(ctx) - 1:-1].double(), -1)  # (len(cont), V)
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def _pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context ids and the continuation's ids as the tail of the whole text's encoding (no special tokens)."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    return ctx, tok(context + continuation, add_special_tokens=False)["input_ids"][len(ctx):]


def _greedy64(model, tok, prompt: str, max_new: int, eos: int) -> str:
    """Greedy decoding without cache or padding: the decoded text of the new tokens before EOS."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == eos:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True)


def _write_tasks(folder, until: str) -> None:
    """Three local tasks: multiple choice (loglikelihood), perplexity (rolling), generation (until `until`)."""
    data = {"mc": QUESTIONS, "ppl": [{"text": t} for t in TEXTS],
            "gen": [{"prompt": p, "target": "none"} for p in PROMPTS]}
    for name, rows in data.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder}/{{name}}.jsonl\n"
              f"  cache_dir: {folder}/hf-cache\ntest_split: test\n")
    yamls = {
        "mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
              "doc_to_target: '{{gold}}'\ntarget_delimiter: ''\nmetric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n",
        "ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
               "metric_list:\n  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n",
        "gen": "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
               f"generation_kwargs:\n  until: [{json.dumps(until)}]\n  max_gen_toks: 12\n  do_sample: false\n"
               "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n",
    }
    for name, body in yamls.items():
        (folder / f"tl_{name}.yaml").write_text(f"task: tl_{name}\n" + common.format(name=name) + body)


def test_lm_eval_scores_match_direct_computation(tiny_llama, tiny_tokenizer, tmp_path):
    from lm_eval.tasks import TaskManager

    from tunelab.eval.lmeval import TunelabLM

    model, tok = tiny_llama.double(), tiny_tokenizer  # float64: padding cannot flip a greedy near-tie
    eos = tok.eos_token_id
    full = [_greedy64(model, tok, p, 12, eos) for p in PROMPTS]
    until = full[0][len(full[0]) // 2:len(full[0]) // 2 + 2]  # occurs in the first output: it must be cut there
    _write_tasks(tmp_path, until)
    lm = TunelabLM(model=model, tokenizer=tok, batch_size=2)
    out = lm_eval.simple_evaluate(model=lm, tasks=["tl_mc", "tl_ppl", "tl_gen"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                                  bootstrap_iters=0)
    samples = {t: sorted(s, key=lambda x: x["doc_id"]) for t, s in out["samples"].items()}

    right = []
    for q, s in zip(QUESTIONS, samples["tl_mc"]):
        got = [r[0] for r in s["resps"]]  # one (loglikelihood, is_greedy) per choice
        ref = [_logp64(model, *_pair(tok, q["question"], c)) for c in q["choices"]]
        assert [g[0] for g in got] == pytest.approx([r[0] for r in ref], abs=1e-9)
        assert [bool(g[1]) for g in got] == [r[1] for r in ref]
        right.append(max(range(len(ref)), key=lambda i: ref[i][0]) == q["gold"])
    assert out["results"]["tl_mc"]["acc,none"] == pytest.approx(sum(right) / len(right))

    for text, s in zip(TEXTS, samples["tl_ppl"]):  # whole text after the prefix token (no BOS here: EOS)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert s["resps"][0][0] == pytest.approx(_logp64(model, [eos], ids)[0], abs=1e-9)

    got = [s["resps"][0][0] for s in samples["tl_gen"]]
    assert got == [f[:f.find(until)] if until in f else f for f in full]
    assert len(got[0]) < len(full[0])  # the stop string did cut


def test_rolling_windows_and_long_inputs_follow_lm_eval(tiny_llama, tiny_tokenizer):
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from tunelab.eval.lmeval import TunelabLM

    model, tok = tiny_llama.double(), tiny_tokenizer
    lm = TunelabLM(model=model, tokenizer=tok, batch_size=3, max_length=8)
    req = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(TEXTS)]
    got = lm.loglikelihood_rolling(req)
    for text, g in zip(TEXTS, got):  # each window scored on its own, as lm-eval defines them
        windows = map(make_disjoint_window, get_rolling_token_windows(
            tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id, 8, 1))
        assert g == pytest.approx(sum(_logp64(model, c, t)[0] for c, t in windows), abs=1e-9)
    # a context longer than max_length keeps its last tokens: 8 inputs, the last of which predicts " the"
    ctx, cont = _pair(tok, TEXTS[0], " the")
    (score, _), = lm.loglikelihood([Instance("loglikelihood", {}, (TEXTS[0], " the"), 0)])
    assert len(cont) == 1 and len(ctx) > 8
    assert score == pytest.approx(_logp64(model, ctx[-8:], cont)[0], abs=1e-9)


def test_model_folder_with_adapter(tiny_llama, tiny_tokenizer, tmp_path):
    """model=<HF folder>, adapter=<LoRA folder>: scores are those of the in-memory LoRA model, not the base."""
    from lm_eval.api.instance import Instance

    from tunelab.eval.lmeval import TunelabLM
    from tunelab.lora import LoraConfig, apply_lora, save_adapter

    tiny_llama.save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    base = _logp64(tiny_llama, *_pair(tiny_tokenizer, "The class statement", " defines"))[0]
    apply_lora(tiny_llama, LoraConfig(r=4, alpha=8, target_modules="all-linear"), verbose=False)
    with torch.no_grad():  # B = 0 at init would make the adapter a no-op
        for name, p in tiny_llama.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    save_adapter(tiny_llama, tmp_path / "adapter")
    tuned = _logp64(tiny_llama, *_pair(tiny_tokenizer, "The class statement", " defines"))[0]
    lm = TunelabLM(model=str(tmp_path / "base"), adapter=str(tmp_path / "adapter"))
    (score, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("The class statement", " defines"), 0)])
    assert abs(tuned - base) > 1e-2
    assert score == pytest.approx(tuned, abs=1e-4)  # the folder model is float32


def test_sampling_request_is_refused(tiny_llama, tiny_tokenizer):
    from lm_eval.api.instance import Instance

    from tunelab.errors import TunelabError
    from tunelab.eval.lmeval import TunelabLM

    lm = TunelabLM(model=tiny_llama, tokenizer=tiny_tokenizer)
    req = Instance("generate_until", {}, ("hi", {"do_sample": True, "temperature": 0.7}), 0)
    with pytest.raises(TunelabError, match="greedily"):
        lm.generate_until([req])
