"""SNI loading, Tk-Instruct prompts and batching.

Expected prompts are written out by hand from the task JSON files in tests/data/sni, following the rules of
Tk-Instruct's DataCollatorForNI (allenai/tk-instruct src/ni_collator.py); token counts and truncation use the real
T5 tokenizer through `transformers` as the oracle.
"""

from __future__ import annotations

import json
import math
import subprocess
import warnings

import pytest
import torch

from nanot5.data.sni import (
    SNICollator,
    format_prompt,
    load_sni,
    load_task,
    prepare_sni,
    prepare_sni_main,
)
from nanot5.errors import DataError


@pytest.fixture(scope="module")
def tok(t5_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(t5_tokenizer_dir))


def _task(sni_dir, name, **kw):
    return load_task(sni_dir / "tasks" / f"{name}.json", **kw)


# --- task1146_country_capital, instance 0 ("Afghanistan"), written out from the JSON -------------------------------
DEF_1146 = (
    "Definition: In this task, you are given a country name and you need to return the capital city of the given "
    "country.\n\n"
)
POS_1146 = (
    " Positive Example 1 -\nInput: United States.\n Output: Washington.\n\n"
    " Positive Example 2 -\nInput: India.\n Output: New Delhi.\n\n"
)
POS_EXPL_1146 = (
    " Positive Example 1 -\nInput: United States.\n Output: Washington.\n"
    " Explanation: Washington is the capital city of United States.\n\n"
    " Positive Example 2 -\nInput: India.\n Output: New Delhi.\n"
    " Explanation: New Delhi is the capital city of India.\n\n"
)
NEG_1146 = (
    " Negative Example 1 -\nInput: France.\n Output: Rome.\n\n"
    " Negative Example 2 -\nInput: Italy.\n Output: Beijing.\n\n"
)
INPUT_1146 = "Now complete the following example -\nInput: Afghanistan.\nOutput: "

# --- task1393_superglue_copa_text_completion, instance 0 ---------------------------------------------------------
DEF_1393 = (
    "Definition: In this task, you are given a premise sentence, two possible options and a question word. If the "
    "question was cause you should select the option that is a possible cause of the premise sentence, and if the "
    "question word was effect you should find the option which is a possible effect of the premise sentence. "
    'Answer with "A" or "B".\n\n'
)
P1_1393 = (
    " Positive Example 1 -\nInput: The animal species became endangered. (A) Their habitat was destroyed. (B) Their "
    "predators went extinct., Question: cause.\n Output: A.\n\n"
)
P2_1393 = (
    " Positive Example 2 -\nInput: The bar closed. (A) It was crowded. (B) It was 3 AM., Question: cause.\n"
    " Output: B.\n\n"
)
P3_1393 = (
    " Positive Example 3 -\nInput: The man was lost. (A) He asked for directions. (B) He drew a map., "
    "Question: effect.\n Output: A.\n\n"
)
INPUT_1393 = (
    "Now complete the following example -\nInput: The man fell unconscious. (A) The assailant struck the man in the "
    "head. (B) The assailant took the man's wallet., Question: cause.\nOutput: "
)


def test_prompt_default_definition_and_two_examples(sni_dir, tok):
    rec = _task(sni_dir, "task1146_country_capital")[0]
    assert rec["input"] == "Afghanistan" and rec["references"] == ["Kabul"]
    expected = (
        "Definition: In this task, you are given a country name and you need to return the capital city of the "
        "given country.\n\n"
        " Positive Example 1 -\nInput: United States.\n Output: Washington.\n\n"
        " Positive Example 2 -\nInput: India.\n Output: New Delhi.\n\n"
        "Now complete the following example -\nInput: Afghanistan.\nOutput: "
    )
    assert format_prompt(rec, tokenizer=tok) == expected
    assert DEF_1146 + POS_1146 + INPUT_1146 == expected


def test_prompt_task_name_explanations_negatives_nan_url_task(sni_dir, tok):
    rec = _task(sni_dir, "task1332_check_leap_year")[1]
    assert rec["input"] == "1604"
    expected = (
        "task1332_check_leap_year. "
        "Definition: In this task, you are given a year. You need to check if it is a leap year or not. A year may be "
        "a leap year if it is evenly divisible by 4. Years that are divisible by 100 (century years such as 1900 or "
        "2000) cannot be leap years unless they are also divisible by 400. Return 1 if it is a leap year, else "
        "return 0.\n\n"
        " Positive Example 1 -\nInput: 1644.\n Output: 1.\n Explanation: 1644 is a leap year as 1644 is divisible "
        "by 4.\n\n"
        # this explanation has no final period in the JSON: the rule adds one
        " Positive Example 2 -\nInput: 2021.\n Output: 0.\n Explanation: 2021 is not a leap year as it is not "
        "divisible by 4.\n\n"
        " Negative Example 1 -\nInput: 1234.\n Output: 0.\n Explanation: 1234 is a leap year as 1234 is divisible "
        "by 4.\n\n"
        " Negative Example 2 -\nInput: 1443.\n Output: 1.\n Explanation: 1443 is not a leap year as it is not "
        "divisible by 4.\n\n"
        "Now complete the following example -\nInput: 1604.\nOutput: "
    )
    got = format_prompt(rec, tokenizer=tok, add_task_name=True, add_explanation=True, num_neg_examples=2)
    assert got == expected


def test_prompt_drops_examples_that_do_not_fit(sni_dir, tok):
    rec = _task(sni_dir, "task1393_superglue_copa_text_completion", max_num_instances=1)[0]
    n = lambda s: len(tok(s)["input_ids"])  # noqa: E731  (counts include </s>, as Tk-Instruct's)
    assert format_prompt(rec, tokenizer=tok) == DEF_1393 + P1_1393 + P2_1393 + INPUT_1393

    # room for one example: the second is dropped, the prompt is not cut
    limit = n(DEF_1393 + P1_1393 + INPUT_1393)
    assert n(DEF_1393 + P1_1393 + P2_1393 + INPUT_1393) > limit
    assert format_prompt(rec, tokenizer=tok, max_source_length=limit) == DEF_1393 + P1_1393 + INPUT_1393
    # one token less: no example fits
    assert format_prompt(rec, tokenizer=tok, max_source_length=limit - 1) == DEF_1393 + INPUT_1393
    # the first example that does not fit ends the list, even if a later one would fit
    assert format_prompt(rec, tokenizer=tok, num_pos_examples=3) == DEF_1393 + P1_1393 + P2_1393 + P3_1393 + INPUT_1393


def test_prompt_source_truncated_to_max_tokens(sni_dir, tok):
    rec = _task(sni_dir, "task1393_superglue_copa_text_completion", max_num_instances=1)[0]
    full = DEF_1393 + INPUT_1393  # no example fits in 40 tokens; definition + input alone are longer
    assert len(tok(full)["input_ids"]) > 40
    expected = tok.decode(tok(full)["input_ids"][:40], skip_special_tokens=True)
    got = format_prompt(rec, tokenizer=tok, max_source_length=40)
    assert got == expected
    assert got.startswith("Definition: In this task, you are given a premise sentence")
    assert "Positive Example" not in got and "Now complete" not in got


class CharTokenizer:
    """One token per character plus </s>: makes Tk-Instruct's length test observable to the character."""

    pad_token_id = 0

    def __call__(self, text, max_length=None, truncation=False):
        def enc(t):
            ids = [ord(c) + 2 for c in t]
            if truncation and max_length is not None:
                ids = ids[: max_length - 1]
            return ids + [1]

        return {"input_ids": [enc(t) for t in text] if isinstance(text, list) else enc(text)}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i - 2) for i in ids if i > 1)


def test_prompt_fit_test_joins_kept_examples_with_spaces(sni_dir):
    # Tk-Instruct measures definition + " ".join(kept) + candidate + input, one character longer per extra kept
    # example than the prompt it builds. At a limit where the final prompt would fit exactly, the third
    # example is therefore rejected.
    rec = _task(sni_dir, "task1393_superglue_copa_text_completion", max_num_instances=1)[0]
    tok = CharTokenizer()
    exact = len(P1_1393 + P2_1393 + P3_1393 + INPUT_1393) + 1  # + </s>
    kw = dict(tokenizer=tok, add_task_definition=False, num_pos_examples=3)
    assert format_prompt(rec, max_source_length=exact, **kw) == P1_1393 + P2_1393 + INPUT_1393
    assert format_prompt(rec, max_source_length=exact + 1, **kw) == P1_1393 + P2_1393 + P3_1393 + INPUT_1393
    # the task name is not part of the test either: it may push the prompt over the limit, which then gets cut
    name = "task1393_superglue_copa_text_completion. "
    got = format_prompt(rec, max_source_length=exact + 1, add_task_name=True, **kw)
    assert got == (name + P1_1393 + P2_1393 + P3_1393 + INPUT_1393)[: exact + 1]


def test_tk_instruct_mode_draws_the_five_layouts(sni_dir, tok):
    rec = _task(sni_dir, "task1146_country_capital", max_num_instances=1)[0]
    layouts = {
        DEF_1146 + INPUT_1146,  # definition only
        POS_1146 + INPUT_1146,  # examples only
        DEF_1146 + POS_1146 + INPUT_1146,
        DEF_1146 + POS_1146 + NEG_1146 + INPUT_1146,
        DEF_1146 + POS_EXPL_1146 + INPUT_1146,
    }
    coll = SNICollator(tok, tk_instruct=True, seed=3)
    seen = [coll([rec])["sources"][0] for _ in range(60)]
    assert set(seen) == layouts
    again = SNICollator(tok, tk_instruct=True, seed=3)
    assert [again([rec])["sources"][0] for _ in range(60)] == seen


def _row(ids, width, pad):
    return ids + [pad] * (width - len(ids))


def test_collator_padding_and_labels(sni_dir, tok):
    recs = _task(sni_dir, "task1146_country_capital", max_num_instances=3) + _task(
        sni_dir, "task1393_superglue_copa_text_completion", max_num_instances=1
    )
    batch = SNICollator(tok, seed=0)(recs)
    assert batch["sources"][0] == DEF_1146 + POS_1146 + INPUT_1146
    assert batch["sources"][3] == DEF_1393 + P1_1393 + P2_1393 + INPUT_1393
    assert batch["ids"] == [r["id"] for r in recs] and batch["tasks"] == [r["task"] for r in recs]
    assert batch["categories"] == ["Misc."] * 3 + ["Cause Effect Classification"]
    assert batch["targets"] == ["Kabul", "Tirana", "Alger", "A"]
    assert batch["references"] == [["Kabul"], ["Tirana"], ["Alger"], ["A"]]

    src = [tok(s)["input_ids"] for s in batch["sources"]]
    width = math.ceil(max(map(len, src)) / 8) * 8
    for t in ("input_ids", "attention_mask", "labels"):
        assert batch[t].dtype == torch.long
    assert batch["input_ids"].tolist() == [_row(s, width, tok.pad_token_id) for s in src]
    assert batch["attention_mask"].tolist() == [_row([1] * len(s), width, 0) for s in src]

    tgt = [tok(t)["input_ids"] for t in batch["targets"]]
    assert tgt[0][-1] == tok.eos_token_id
    assert batch["labels"].shape == (4, 8)
    assert batch["labels"].tolist() == [_row(t, 8, -100) for t in tgt]


def test_collator_truncates_targets_and_no_multiple(sni_dir, tok):
    recs = _task(sni_dir, "task102_commongen_sentence_generation", max_num_instances=2)
    batch = SNICollator(tok, max_target_length=5, pad_to_multiple_of=None, seed=0)(recs)
    want = [tok(t, max_length=5, truncation=True)["input_ids"] for t in batch["targets"]]
    assert all(len(w) == 5 and w[-1] == tok.eos_token_id for w in want)  # these references are long sentences
    assert batch["labels"].tolist() == want
    src = [tok(s)["input_ids"] for s in batch["sources"]]
    assert batch["input_ids"].shape[1] == max(map(len, src))


def test_collator_draws_one_reference_per_instance_and_resumes(sni_dir, tok):
    rec = _task(sni_dir, "task102_commongen_sentence_generation", max_num_instances=1)[0]
    assert len(rec["references"]) == 3
    a = SNICollator(tok, seed=1)
    first = [a([rec])["targets"][0] for _ in range(5)]
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON round trip
    rest = [a([rec])["targets"][0] for _ in range(20)]
    assert set(first + rest) == set(rec["references"])  # every reference gets drawn
    b = SNICollator(tok, seed=99)
    b.load_state_dict(state)
    assert [b([rec])["targets"][0] for _ in range(20)] == rest


def test_empty_string_reference_loads_and_collates(sni_dir, tok):
    recs = _task(sni_dir, "task1564_triviaqa_answer_generation")
    rec = next(r for r in recs if r["id"] == "task1564-1ba86d73c8224fad9b4d88f37a37a316")
    assert rec["references"] == [""]
    batch = SNICollator(tok)([rec])
    assert batch["targets"] == [""]
    assert batch["labels"].tolist() == [[tok.eos_token_id] + [-100] * 7]


def test_nan_url_task_loads(sni_dir):
    path = sni_dir / "tasks" / "task1332_check_leap_year.json"
    raw = path.read_text(encoding="utf-8")
    with pytest.raises(ValueError):  # a strict JSON parser rejects the file ...
        json.loads(raw, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    recs = load_task(path)  # ... we load it
    assert len(recs) == 100
    assert recs[0]["id"] == "task1332-36b3dfff17b74b58a5dc4a1a05856ed8" and recs[0]["references"] == ["0"]


def test_first_n_instances_in_file_order(sni_dir):
    path = sni_dir / "tasks" / "task363_sst2_polarity_classification.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    recs = load_task(path, max_num_instances=7)
    assert [r["id"] for r in recs] == [i["id"] for i in raw["Instances"][:7]]
    assert [r["references"] for r in recs] == [i["output"] for i in raw["Instances"][:7]]
    assert recs[0]["definition"] == raw["Definition"][0]
    assert recs[0]["categories"] == raw["Categories"]
    assert len(load_task(path, max_num_instances=None)) == len(raw["Instances"])
    shuffled = load_task(path, max_num_instances=7, shuffle_seed=0)
    assert {r["id"] for r in shuffled} <= {i["id"] for i in raw["Instances"]}
    assert [r["id"] for r in shuffled] != [r["id"] for r in recs]


def test_load_sni_split_skips_missing_tasks_with_one_warning(sni_dir):
    listed = (sni_dir / "splits" / "default" / "test_tasks.txt").read_text().split()
    present = [t for t in listed if (sni_dir / "tasks" / f"{t}.json").is_file()]
    assert 0 < len(present) < len(listed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recs = load_sni(sni_dir, "test")
    msgs = [str(w.message) for w in caught if "SNI" in str(w.message)]
    assert len(msgs) == 1 and f"{len(listed) - len(present)} of {len(listed)}" in msgs[0]
    assert [r["task"] for r in recs[::100]] == present
    assert len(recs) == 100 * len(present)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the small split is complete: no warning
        train = load_sni(sni_dir, "train", split="small", max_num_instances_per_task=3)
    listed_small = (sni_dir / "splits" / "small" / "train_tasks.txt").read_text().split()
    assert [r["task"] for r in train[::3]] == listed_small


def test_load_sni_errors_name_the_path(tmp_path, sni_dir):
    with pytest.raises(FileNotFoundError, match="nosuch"):
        load_sni(sni_dir, "train", split="nosuch")
    (tmp_path / "splits" / "x").mkdir(parents=True)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "splits" / "x" / "train_tasks.txt").write_text("task1_missing\ntask2_missing\n")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tasks")):
        load_sni(tmp_path, "train", split="x")
    bad = tmp_path / "tasks" / "task3_bad.json"
    bad.write_text('{"Definition": ["d"],\n "Instances": [}')
    with pytest.raises(ValueError, match=r"task3_bad\.json.*line 2"):
        load_task(bad)
    bad.write_text('{"Definition": ["d"], "Positive Examples": [], "Instances": [{"input": "x", "output": 3}]}')
    with pytest.raises(ValueError, match=r"task3_bad\.json.*Instances\[0\]"):
        load_task(bad)


def test_prepare_keeps_an_existing_checkout(sni_dir, capsys):
    assert prepare_sni(sni_dir) == sni_dir
    assert prepare_sni_main([str(sni_dir)]) == 0
    assert f"data.sni_dir={sni_dir}" in capsys.readouterr().out


def test_prepare_clones_and_explains_failure(tmp_path, capsys):
    # a local repository stands in for GitHub: no network in tests
    src = tmp_path / "upstream"
    (src / "splits" / "default").mkdir(parents=True)
    (src / "tasks").mkdir()
    (src / "splits" / "default" / "train_tasks.txt").write_text("task1_a\n")
    (src / "tasks" / "task1_a.json").write_text("{}")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run(git + ["init", "-q", str(src)], check=True)
    subprocess.run(git + ["-C", str(src), "add", "."], check=True)
    subprocess.run(git + ["-C", str(src), "commit", "-q", "-m", "x"], check=True)
    dest = tmp_path / "sni"
    assert prepare_sni_main([str(dest), "--url", f"file://{src}"]) == 0
    assert (dest / "tasks" / "task1_a.json").is_file()

    with pytest.raises(DataError) as err:
        prepare_sni_main([str(tmp_path / "other"), "--url", f"file://{tmp_path}/nothing-here"])
    assert "git clone --depth 1" in str(err.value) and "data.sni_dir" in str(err.value)


# --- which instances: Tk-Instruct's seeded sample for training tasks, the first N for test tasks -----------------


def _write_sni(root, tasks: dict[str, list], train: list[str], test: list[str]):
    (root / "tasks").mkdir(parents=True)
    (root / "splits" / "x").mkdir(parents=True)
    for name, instances in tasks.items():
        body = {"Definition": [f"Do {name}."], "Categories": ["Misc."], "Positive Examples": [],
                "Instances": instances}
        (root / "tasks" / f"{name}.json").write_text(json.dumps(body))
    (root / "splits" / "x" / "train_tasks.txt").write_text("".join(n + "\n" for n in train))
    (root / "splits" / "x" / "test_tasks.txt").write_text("".join(n + "\n" for n in test))
    return root


def test_train_tasks_are_a_seeded_sample_as_tk_instruct(tmp_path):
    import random

    tasks = {f"task{k}_t": [{"id": f"t{k}-{i}", "input": f"x{i}", "output": [f"y{i}"]} for i in range(10 + k)]
             for k in range(3)}
    root = _write_sni(tmp_path, tasks, train=["task2_t", "task0_t"], test=["task1_t"])
    # Tk-Instruct's ni_dataset.py, written out: one RNG (seeded once) shuffles every listed train task's
    # instances in list order; each task keeps the first N; test tasks keep the file's first N
    rng = random.Random(7)
    want = []
    for name in ["task2_t", "task0_t"]:
        instances = list(tasks[name])
        rng.shuffle(instances)
        want += [i["id"] for i in instances[:4]]
    got = [r["id"] for r in load_sni(root, "train", split="x", max_num_instances_per_task=4, seed=7)]
    assert got == want
    assert got[:4] != ["t2-0", "t2-1", "t2-2", "t2-3"]  # not the first N
    assert [r["id"] for r in load_sni(root, "train", split="x", max_num_instances_per_task=4, seed=8)] != want
    assert [r["id"] for r in load_sni(root, "test", split="x", max_num_instances_per_task=4, seed=7)] == \
        ["t1-0", "t1-1", "t1-2", "t1-3"]
    assert [r["id"] for r in load_sni(root, "train", split="x", max_num_instances_per_task=4, seed=None)] == \
        ["t2-0", "t2-1", "t2-2", "t2-3", "t0-0", "t0-1", "t0-2", "t0-3"]  # seed=None: the old first-N rule


def test_staged_train_tasks_sampled_test_tasks_first_n(sni_dir):
    train = load_sni(sni_dir, "train", split="small", max_num_instances_per_task=5)  # default seed 0
    first = load_sni(sni_dir, "train", split="small", max_num_instances_per_task=5, seed=None)
    assert len(train) == len(first) == 50 and [r["task"] for r in train] == [r["task"] for r in first]
    assert [r["id"] for r in train] != [r["id"] for r in first]
    assert train == load_sni(sni_dir, "train", split="small", max_num_instances_per_task=5)  # deterministic
    test = load_sni(sni_dir, "test", split="small", max_num_instances_per_task=5)
    raw = json.loads((sni_dir / "tasks" / f"{test[0]['task']}.json").read_text(encoding="utf-8"))
    assert [r["id"] for r in test[:5]] == [i["id"] for i in raw["Instances"][:5]]


def test_unusable_instances_are_skipped_and_counted(tmp_path, tok):
    from collections import Counter

    instances = [
        {"id": "a", "input": "fine", "output": ["yes"]},
        {"id": "b", "input": "no answer", "output": []},
        {"id": "c", "input": None, "output": ["x"]},
        {"id": "d", "input": "null answer", "output": None},
        {"id": "e", "input": "also fine", "output": ["", "no"]},
    ]
    root = _write_sni(tmp_path, {"task1_a": instances, "task2_b": instances}, train=["task1_a"], test=["task2_b"])
    for subset in ("train", "test"):
        skipped = Counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            recs = load_sni(root, subset, split="x", skipped=skipped)
        assert sorted(r["id"] for r in recs) == ["a", "e"]
        assert skipped == Counter(empty_output=2, null_input=1)
        msgs = [str(w.message) for w in caught]
        assert len(msgs) == 1 and f"skipped 3 {subset} instances" in msgs[0] and "null input" in msgs[0]
        batch = SNICollator(tok)(recs)  # what is left collates: no traceback hours into a run
        assert batch["labels"].shape[0] == 2
    # the count applies to the selected instances: with N=1 only instance "a" is looked at in the test task
    skipped = Counter()
    assert [r["id"] for r in load_sni(root, "test", split="x", max_num_instances_per_task=1, skipped=skipped)] == ["a"]
    assert not skipped
