from __future__ import annotations

import pytest
import torch

from fedtune.data.tasks import IGNORE, ClassificationTask, GenerationTask, collate, normalize, rouge_l
from fedtune.train.losses import label_scores, lm_loss


def make_cls(tok, **kw):
    args = dict(system_prompt="You are a helpful assistant.", use_chat_template=True, max_length=128)
    args.update(kw)
    return ClassificationTask(tok, "Review: {text}\nPositive or negative?", ["positive", "negative"], None, **args)


def test_classification_targets_are_the_label_tokens_after_the_chat_prompt(tiny):
    _, tok = tiny
    task = make_cls(tok)
    ex = task.encode({"text": "great film", "label": "negative"}, "label")
    assert ex.label == 1
    text = tok.decode(ex.prompt_ids + ex.target_ids)
    assert text.endswith("<|im_start|>assistant\nnegative")
    assert tok.decode(ex.target_ids) == "negative"
    assert task.first_token_ids == [t[0] for t in task.label_token_ids]


def test_label_map_and_unknown_label_message(tiny):
    _, tok = tiny
    task = ClassificationTask(tok, "{sentence}", ["negative", "positive"], {"0": "negative", "1": "positive"},
                              system_prompt=None, use_chat_template=True, max_length=64)
    assert task.encode({"sentence": "x", "label": "1"}, "label").label == 1
    with pytest.raises(ValueError, match=r"data.tsv row 7: label '2' is not one of"):
        task.encode({"sentence": "x", "label": "2"}, "label", where="data.tsv row 7")


def test_label_words_sharing_a_first_token_are_refused(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="same token"):
        ClassificationTask(tok, "{text}", ["pos", "positively"], None, system_prompt=None,
                           use_chat_template=True, max_length=64)


def test_long_prompts_keep_their_end(tiny):
    _, tok = tiny
    task = make_cls(tok, max_length=20)
    ex = task.encode({"text": "word " * 200, "label": "positive"}, "label")
    assert len(ex.prompt_ids) + len(ex.target_ids) == 20
    assert tok.decode(ex.prompt_ids).endswith("assistant\n")


def test_collate_pads_right_and_masks_prompt(tiny):
    _, tok = tiny
    task = make_cls(tok)
    exs = [task.encode({"text": t, "label": "positive"}, "label") for t in ("a", "a much longer review text")]
    b = collate(exs, pad_id=tok.pad_token_id)
    for i, e in enumerate(exs):
        n, m = len(e.prompt_ids), len(e.prompt_ids) + len(e.target_ids)
        assert b["attention_mask"][i].sum() == m
        assert (b["labels"][i, :n] == IGNORE).all() and (b["labels"][i, m:] == IGNORE).all()
        assert b["labels"][i, n:m].tolist() == e.target_ids
        assert b["last"][i] == n - 1


def test_lm_loss_equals_transformers_full_logits_loss(tiny):
    model, tok = tiny
    task = GenerationTask(tok, "{q}", "rouge_l", 8, system_prompt=None, use_chat_template=True, max_length=64)
    exs = [task.encode({"q": q, "response": r}, "response")
           for q, r in [("2+2?", "four"), ("Capital of France?", "Paris is the capital")]]
    b = collate(exs, pad_id=tok.pad_token_id)
    ours, n = lm_loss(model, b)
    ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert n == sum(len(e.target_ids) for e in exs)


def test_label_scores_equal_full_logits_at_the_last_prompt_token(tiny):
    model, tok = tiny
    task = make_cls(tok)
    exs = [task.encode({"text": t, "label": "positive"}, "label") for t in ("fine", "an utterly boring film")]
    b = collate(exs, pad_id=tok.pad_token_id, with_target=False)
    scores = label_scores(model, b, task.first_token_ids)
    full = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    for i, e in enumerate(exs):
        torch.testing.assert_close(scores[i], full[i, len(e.prompt_ids) - 1, task.first_token_ids])


def test_rouge_l_against_hand_computed_values():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # LCS("the cat was on mat", "the cat sat on the mat") = the cat on mat = 4; P = 4/5, R = 4/6
    p, r = 4 / 5, 4 / 6
    assert rouge_l("The cat was on mat.", "the cat sat on the mat") == pytest.approx(2 * p * r / (p + r))
    assert rouge_l("dog", "cat") == 0.0
    assert normalize("  The  ANSWER, is: 42! ") == "the answer is 42"
