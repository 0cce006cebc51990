"""Honest task handling: names, groups and tags, and every task problem in one line before a model loads."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil

import datasets
import pytest
from conftest import DATA, build_model, prune_main

from prune.core.errors import PruneError
from prune.measure.lmeval import check_tasks, evaluate_tasks, local_task_dir


@pytest.fixture(scope="module")
def no_weights(tiny_folder, tmp_path_factory):
    """The tiny model's folder without its weights: loading it fails, so an error about the tasks
    proves the tasks were checked before any model loaded."""
    folder = tmp_path_factory.mktemp("noweights") / "m"
    shutil.copytree(tiny_folder, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """User task YAMLs: a tag over two copies of the local COPA, a group with an aggregate, an empty group."""
    folder = tmp_path_factory.mktemp("tasks")
    copa = local_task_dir(DATA) / "copa_local.yaml"
    for name in ("copa_a", "copa_b"):
        (folder / f"{name}.yaml").write_text(f"include: {copa}\ntask: {name}\ntag: [my_tag]\n")
    (folder / "my_group.yaml").write_text("group: my_group\ntask: [copa_local, piqa_local]\n"
                                          "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n")
    (folder / "empty.yaml").write_text("group: empty_group\ntask: []\n")
    return folder


def one_line_error(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_unknown_task_before_loading(no_weights, monkeypatch):
    monkeypatch.delenv("PRUNE_DATA_DIR", raising=False)  # lm-eval's registry alone: indexed once for this and the next
    line = one_line_error(prune_main("eval", no_weights, "--tasks", "arc_eezy"))
    assert "unknown lm-eval task 'arc_eezy'" in line and "give --data-dir (evaluate.data_dir in a recipe)" in line


def test_uncached_registry_task_offline_before_loading(no_weights, monkeypatch):
    monkeypatch.delenv("PRUNE_DATA_DIR", raising=False)
    line = one_line_error(prune_main("eval", no_weights, "--tasks", "arc_easy"))
    assert "lm-eval task 'arc_easy': its data could not be loaded" in line
    assert "offline and not in the datasets cache" in line and "local copy arc_easy_local" in line


def test_empty_group_before_loading(no_weights, task_dir):
    line = one_line_error(prune_main("eval", no_weights, "--tasks", "empty_group", "--include-path", task_dir,
                                    "--data-dir", DATA))
    assert "group or tag 'empty_group' has no task in it" in line


def test_fewshot_from_the_scored_split_is_refused_before_loading(no_weights):
    line = one_line_error(prune_main("eval", no_weights, "--tasks", "copa", "--num-fewshot", 2, "--data-dir", DATA))
    assert "2-shot examples would be drawn from its 'test' split, the split it scores" in line
    assert "--fewshot-from-scored-split (evaluate.fewshot_from_scored_split in a recipe" in line  # the flag it has


def test_fewshot_from_the_scored_split_when_allowed_is_marked(tokenizers_by_bos, tmp_path, monkeypatch, capfd):
    check_tasks(["copa"], data_dir_path=DATA, num_fewshot=2, fewshot_from_scored_split=True)
    monkeypatch.chdir(tmp_path)  # outside a git checkout: lm-eval's git describe printed "fatal: not a git repository"
    res = evaluate_tasks(build_model("llama"), tokenizers_by_bos[True], ["copa"], limit=4, num_fewshot=2,
                         data_dir_path=DATA, progress=False)
    assert res["copa_local"]["fewshot_from_scored_split"] is True
    assert "fatal" not in capfd.readouterr().err


def test_few_shot_is_counted_as_lm_eval_counts_it(tokenizers_by_bos, tmp_path):
    """Without num_fewshot a task gets its YAML's number (the old default 0 replaced it: a 2-shot task
    ran 0-shot, unlike lm_eval); a task whose YAML says 0 stays 0-shot whatever is asked. The pre-flight
    judges the number that will run, and eval.json / the card keep what each task got."""
    from prune.export.card import shots_text
    from prune.measure.lmeval import n_shots

    copa = (local_task_dir(DATA) / "copa_local.yaml").read_text()
    for name, shots in (("copa_two", 2), ("copa_zero", 0)):
        text = copa.replace("task: copa_local", f"task: {name}").replace("tag: [prune_local]\n", "")
        (tmp_path / f"{name}.yaml").write_text(text + f"num_fewshot: {shots}\n")
    where = dict(data_dir_path=DATA, task_dirs=[str(tmp_path)])
    with pytest.raises(PruneError, match="'copa_two': 2-shot examples would be drawn from its 'test' split"):
        check_tasks(["copa_two"], **where)  # 2-shot by its YAML, from the split it scores
    check_tasks(["copa_two"], num_fewshot=0, **where)  # asked 0: runs 0-shot
    check_tasks(["copa_zero"], num_fewshot=3, **where)  # its YAML's 0 wins
    model, tok = build_model("llama"), tokenizers_by_bos[True]
    res = evaluate_tasks(model, tok, ["copa_two", "copa_zero"], limit=2, progress=False, **where)
    assert n_shots({"tasks": res}) == {"copa_two": 2, "copa_zero": 0}
    assert res["copa_two"]["fewshot_from_scored_split"] is True
    res = evaluate_tasks(model, tok, ["copa_two", "copa_zero"], limit=2, num_fewshot=1, progress=False, **where)
    assert n_shots({"tasks": res}) == {"copa_two": 1, "copa_zero": 0}
    assert shots_text({"num_fewshot": 1, "n_shot": n_shots({"tasks": res})}) == "copa_two 1-shot, copa_zero 0-shot"
    assert shots_text({"num_fewshot": None, "n_shot": {"a": 0, "b": 0}}) == "0-shot"
    # few-shot examples fixed in the YAML (fewshot_config.samples) come from no split: accepted by the pre-flight
    # and not marked (they were marked "few-shot from the scored split": the two rules differed)
    fixed = copa.replace("task: copa_local", "task: copa_fixed").replace("tag: [prune_local]\n", "") + (
        "num_fewshot: 2\nfewshot_config:\n  sampler: first_n\n  samples:\n"
        "    - {query: 'The sun rose, therefore', gold: 0, choices: ['it got light.', 'it got dark.']}\n"
        "    - {query: 'I was hungry, therefore', gold: 0, choices: ['I ate.', 'I slept.']}\n")
    (tmp_path / "copa_fixed.yaml").write_text(fixed)
    check_tasks(["copa_fixed"], **where)
    res = evaluate_tasks(model, tok, ["copa_fixed"], limit=2, progress=False, **where)
    assert res["copa_fixed"]["n_shot"] == 2 and "fewshot_from_scored_split" not in res["copa_fixed"]


def test_more_shots_than_the_few_shot_split_holds_is_refused_before_loading(tmp_path):
    """lm-eval samples the few-shot examples at run time and failed with 'Sample larger than population' after the
    model was loaded and scored: the pre-flight counts the split."""
    copa = (local_task_dir(DATA) / "copa_local.yaml").read_text()
    rows = (DATA / "tasks" / "copa.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:2]) + "\n")
    test = f'test: "{DATA / "tasks" / "copa.jsonl"}"'
    assert test in copa
    text = copa.replace("task: copa_local", "task: copa_small").replace("tag: [prune_local]\n", "").replace(
        test, f'{test}\n    train: "{tmp_path}/train.jsonl"')
    (tmp_path / "copa_small.yaml").write_text(text + "training_split: train\n")
    where = dict(data_dir_path=DATA, task_dirs=[str(tmp_path)])
    check_tasks(["copa_small"], num_fewshot=2, **where)
    with pytest.raises(PruneError, match="3-shot examples are drawn from its 'train' split, which holds 2 example"):
        check_tasks(["copa_small"], num_fewshot=3, **where)
    # scoring its validation split and naming no few-shot split, lm-eval draws one example more (then drops the
    # question): 2 examples hold 1 shot, not 2 (accepted, then "Sample larger than population")
    scored_val = copa.replace("task: copa_local", "task: copa_val").replace("tag: [prune_local]\n", "").replace(
        test, f'test: "{tmp_path}/train.jsonl"').replace("test_split: test", "validation_split: test")
    (tmp_path / "copa_val.yaml").write_text(scored_val)
    check_tasks(["copa_val"], num_fewshot=1, fewshot_from_scored_split=True, **where)
    with pytest.raises(PruneError, match="which holds 2 example.*lower num_fewshot to at most 1"):
        check_tasks(["copa_val"], num_fewshot=2, fewshot_from_scored_split=True, **where)


def test_tags_and_groups_report_every_task_and_the_aggregate(tokenizers_by_bos, task_dir):
    assert check_tasks(["my_tag", "my_group"], data_dir_path=DATA, task_dirs=[str(task_dir)]) == ["my_tag", "my_group"]
    res = evaluate_tasks(build_model("llama"), tokenizers_by_bos[True], ["my_tag", "my_group"], limit=4,
                         data_dir_path=DATA, task_dirs=[str(task_dir)], progress=False)
    assert {"copa_a", "copa_b", "copa_local", "piqa_local", "my_group"} <= set(res)
    group = res["my_group"]
    assert group["group"] is True
    members = (res["copa_local"]["metrics"]["acc"], res["piqa_local"]["metrics"]["acc"])
    assert group["metrics"]["acc"] == pytest.approx(sum(members) / 2)  # equal sizes (limit 4)


def test_local_alias_reports_registry_names(tokenizers_by_bos):
    res = evaluate_tasks(build_model("llama"), tokenizers_by_bos[True], ["copa"], limit=4, data_dir_path=DATA,
                         progress=False, local_alias=True)
    assert set(res) == {"copa"}


def test_local_tasks_resolve_without_indexing_lm_evals_registry(task_dir, tmp_path):
    """Local copies (and user task folders) resolve from their own YAMLs; lm-eval's ~10,000 registry
    YAMLs are indexed only when a task is not among them, and then once per process, until a
    task folder changes."""
    from prune.measure.lmeval import resolve_tasks

    names, manager = resolve_tasks(["arc_easy", "copa_local", "my_group"], data_dir_path=DATA, task_dirs=[task_dir])
    assert names == ["arc_easy_local", "copa_local", "my_group"]
    assert "arc_easy" not in manager.all_tasks and len(manager.all_tasks) < 50  # the registry was not indexed
    names, full = resolve_tasks(["arc_easy_local", "lambada_openai"], data_dir_path=DATA)
    assert names == ["arc_easy_local", "lambada_openai"] and "arc_easy" in full.all_tasks
    assert resolve_tasks(["lambada_openai"], data_dir_path=DATA)[1] is full  # built once
    mine = tmp_path / "mine"
    shutil.copytree(task_dir, mine)
    first = resolve_tasks(["copa_a"], data_dir_path=DATA, task_dirs=[mine])[1]
    assert resolve_tasks(["copa_b"], data_dir_path=DATA, task_dirs=[mine])[1] is first
    (mine / "copa_c.yaml").write_text((mine / "copa_a.yaml").read_text().replace("copa_a", "copa_c"))
    again = resolve_tasks(["copa_c"], data_dir_path=DATA, task_dirs=[mine])[1]  # added since: found
    assert again is not first and "copa_c" in again.all_tasks and "arc_easy" not in again.all_tasks


def test_last_word_task_scores_the_exact_last_word_of_each_story(tokenizers_by_bos, tmp_path):
    """``tinystories_lastword_local`` (LAMBADA-style): one example per story of the shared TinyStories
    file, the context the story up to its last word, the target that word after a space (the file's
    last piece, cut at 2 MiB, is not a story)."""
    from prune.measure.lmeval import run_lm_eval

    text = (DATA / "tinystories" / "tinystories_sample_2MiB.txt").read_text()
    stories = [s.strip() for s in text.split("<|endoftext|>")]
    if not text.rstrip().endswith("<|endoftext|>"):
        stories = stories[:-1]  # cut by the 2 MiB sample: "... She said it was" is not a story's end
    expected = []
    for story in filter(None, stories):
        head, _, word = story.rpartition(" ")
        while word and not (word[-1].isalpha() or word[-1] == "'"):  # the punctuation after it, curly quotes too
            word = word[:-1]
        if head and word[:1].isalpha() and word.replace("'", "").isascii() and word.replace("'", "").isalpha():
            expected.append((head, word))
    assert check_tasks(["tinystories_lastword_local"], data_dir_path=DATA) == ["tinystories_lastword_local"]
    run = run_lm_eval(build_model("llama"), tokenizers_by_bos[True], ["tinystories_lastword_local"], limit=6,
                      batch_size=4, data_dir_path=DATA, progress=False)
    assert run.summary["tinystories_lastword_local"]["n"] == 6
    run.write(tmp_path, "tiny")
    docs = [json.loads(line) for line in next(tmp_path.glob("samples_*.jsonl")).read_text().splitlines()]
    assert [(d["doc"]["context"], d["target"]) for d in docs] == [(c, " " + w) for c, w in expected[:6]]
    assert run.summary["tinystories_lastword_local"]["metrics"]["acc"] == sum(d["acc"] for d in docs) / 6
    assert expected[0][1] == "together"  # "... They both felt happy because they had shared and worked together."
    # every story, through the task's own process_docs as lm-eval imports it (from the materialised folder)
    spec = importlib.util.spec_from_file_location("lastword", local_task_dir(DATA) / "lastword.py")
    lastword = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lastword)
    whole = datasets.Dataset.from_dict({"text": [(DATA / "tinystories" / "tinystories_sample_2MiB.txt").read_text()]})
    assert [(d["context"], d["target"]) for d in lastword.process_docs(whole)] == expected


def test_copa_and_boolq_local_prompts_are_lm_eval_s_own():
    """The local COPA and BoolQ copies build the requests lm-eval's super_glue tasks build (the copy's
    query writes "faucet, therefore" and "Passage: ...", which lm-eval's prompts do not have)."""
    import jinja2
    from lm_eval.tasks import get_task_dict

    from prune.measure.lmeval import resolve_tasks

    names, manager = resolve_tasks(["copa", "boolq"], data_dir_path=DATA)
    tasks = get_task_dict(names, manager)
    for task in tasks.values():
        task.build_all_requests(limit=1, rank=0, world_size=1)
    copa = [i.arguments for i in tasks["copa_local"].instances]
    spec = importlib.util.spec_from_file_location(
        "copa_utils", importlib.util.find_spec("lm_eval").submodule_search_locations[0] + "/tasks/super_glue/copa/utils.py")
    official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official)
    doc = {"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
           "choice2": "Water flowed from the spout.", "question": "effect", "label": 1}  # COPA's first question
    assert copa == [(official.doc_to_text(doc), " " + c) for c in official.doc_to_choice(doc)]
    context, _ = tasks["boolq_local"].instances[0].arguments
    first = json.loads((DATA / "tasks" / "boolq.jsonl").open().readline())
    passage, question = first["query"].removeprefix("Passage: ").split("\nQuestion: ")
    template = jinja2.Template("{{passage}}\nQuestion: {{question}}?\nAnswer:")  # lm-eval's boolq doc_to_text
    assert context == template.render(passage=passage, question=question.removesuffix("?"))


def test_hellaswag_local_contexts_are_lm_eval_s_own():
    """lm-eval's hellaswag capitalises ctx_b and removes bracketed tags; the copy's query keeps both as HF has them
    ("... sitting on a roof. he"): 3,250 of its 10,042 questions differed from lm-eval's until the local task cleaned
    them as lm-eval does. Checked against lm-eval's own process_docs on HF's first two validation rows, its own
    preprocess on every ending, and by hand on a tagged row and a WikiHow row whose last "sentence" follows an
    abbreviation (no ctx_b there: nothing capitalised)."""
    from lm_eval.tasks import get_task_dict

    from prune.measure.lmeval import resolve_tasks

    names, manager = resolve_tasks(["hellaswag"], data_dir_path=DATA)
    task = get_task_dict(names, manager)["hellaswag_local"]
    task.build_all_requests(limit=2, rank=0, world_size=1)
    spec = importlib.util.spec_from_file_location(
        "hellaswag_utils", importlib.util.find_spec("lm_eval").submodule_search_locations[0] + "/tasks/hellaswag/utils.py")
    official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official)
    rows = [  # Rowan/hellaswag validation rows 0 and 1, the fields lm-eval reads
        {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he", "label": "3",
         "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                     "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
        {"activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.",
         "ctx_b": "the lady", "label": "3",
         "endings": ["swings and lands in her arms.", "pulls the barbell forward.",
                     "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."]}]
    expected = official.process_docs(datasets.Dataset.from_list(rows))
    requests = sorted((i.doc_id, i.idx, i.arguments) for i in task.instances)
    assert [r[2] for r in requests] == [(d["query"], " " + c) for d in expected for c in d["choices"]]
    assert requests[0][2][0] == "Roof shingle removal: A man is sitting on a roof. He"
    # the whole copy, through the task's own process_docs as lm-eval imports it
    spec = importlib.util.spec_from_file_location("hellaswag_context", local_task_dir(DATA) / "hellaswag_context.py")
    local = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(local)
    files = sorted(str(f) for f in (DATA / "tasks" / "hellaswag").glob("*.jsonl"))
    raw = datasets.load_dataset("json", data_files=files, split="train")
    docs = local.process_docs(raw)
    assert len(docs) == 10042 and all(d["choices"] == [official.preprocess(c) for c in r["choices"]]
                                      for d, r in zip(docs, raw))
    assert "[www.kiddio.org]" in raw[3505]["query"] and "kiddio" not in docs[3505]["query"]  # a tag, removed
    assert raw[3861]["query"].endswith("fully disassemble it.") and docs[3861]["query"] == raw[3861]["query"]


def test_local_tasks_name_the_data_folder_only_where_they_read_it():
    """lm-eval copies each task's config (metadata included) into its results files, which a push
    uploads: the data folder's absolute path appears only in the data-file entries (which the run
    folder records relative to $PRUNE_DATA_DIR), never in the metadata's prose."""
    for task in sorted(local_task_dir(DATA).glob("*.yaml")):
        for line in task.read_text().splitlines():
            if str(DATA) in line:
                assert line.strip().startswith("test:"), f"{task.name}: {line.strip()}"


def test_a_chat_template_the_tokenizer_lacks_is_refused_before_loading(tiny_folder, tmp_path):
    """--apply-chat-template on a tokenizer without one: lm-eval failed with a traceback, after the model was
    loaded (and in a run, after scoring, selection and the original's evaluation: the fix then refused --resume)."""
    import prune

    line = one_line_error(prune_main("eval", tiny_folder, "--tasks", "copa", "--data-dir", DATA, "--limit", 2,
                                     "--apply-chat-template", "-q"))
    assert "--apply-chat-template: the tokenizer has no chat template" in line
    from conftest import tiny_recipe

    recipe = tiny_recipe(tiny_folder, tmp_path / "out")
    recipe["evaluate"].update(tasks=["copa"], limit=2, data_dir=str(DATA), apply_chat_template=True)
    with pytest.raises(PruneError, match="evaluate.apply_chat_template: the tokenizer has no chat template"):
        prune.run(recipe, quiet=True)
    from conftest import build_tokenizer
    from prune.measure.lmeval import check_chat_template

    tok = build_tokenizer(True)
    tok.chat_template = {"tool_use": "{{ messages }}", "rag": "{{ messages }}"}  # named templates, no default
    with pytest.raises(PruneError, match="templates are tool_use, rag and none is 'default'"):
        check_chat_template(tok, True)
    check_chat_template(tok, "rag")
    tok.chat_template = "{{ messages }}"  # one template: lm-eval uses it whatever name is asked for
    check_chat_template(tok, "anything")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.progress"))


def test_a_named_fewshot_split_takes_precedence_over_fixed_samples():
    """lm-eval draws the few-shot examples from a named split even when samples are given (it warns): such a task
    with the split it scores is refused / marked (the samples were taken to win)."""
    from prune.measure.lmeval import fewshot_splits

    samples = {"samples": [{"query": "q", "gold": 0, "choices": ["a", "b"]}]}
    assert fewshot_splits({"test_split": "test", "fewshot_split": "test", "fewshot_config": samples}.get) == ("test", "test")
    assert fewshot_splits({"test_split": "test", "fewshot_config": {**samples, "split": "train"}}.get) == ("train", "test")
    assert fewshot_splits({"test_split": "test", "fewshot_config": samples}.get) == (None, "test")
    assert fewshot_splits({"test_split": "test", "training_split": "train"}.get) == ("train", "test")


def test_a_local_copy_whose_file_is_missing_says_so(tmp_path):
    """A data folder without a task's file: the line said "offline and not in the datasets cache: run once online to
    cache it", a Hub dataset's advice, for a file on this disk."""
    (tmp_path / "tasks").mkdir()
    with pytest.raises(PruneError) as err:
        check_tasks(["piqa"], data_dir_path=tmp_path)
    line = str(err.value)
    assert "lm-eval task 'piqa': its data could not be loaded" in line
    assert line.endswith(f"; check its data file {tmp_path.resolve() / 'tasks' / 'piqa.jsonl'}")
    assert "online" not in line and "\n" not in line


def test_a_local_copy_whose_file_is_broken_names_the_file_and_the_fault(tmp_path, caplog):
    """A JSON line cut short: the line said "An error occurred while generating the dataset; check its data
    files", the file and the fault only in datasets' own log line above it."""
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "copa.jsonl").write_text('{"query": "a", "choices": ["x"')
    with pytest.raises(PruneError) as err:
        check_tasks(["copa"], data_dir_path=tmp_path)
    line = str(err.value)
    assert re.search(r"its data could not be loaded \(An error occurred while generating the dataset: .*position", line)
    assert line.endswith(f"; check its data file {tmp_path.resolve() / 'tasks' / 'copa.jsonl'}") and "\n" not in line
    assert not [r for r in caplog.records if r.name.startswith("datasets")]  # said once, in the line


def test_a_data_folder_named_with_quotes_and_backslashes_works(tmp_path):
    """The folder's path goes into the copies' YAML strings: a '"' in it broke the YAML, and lm-eval called the
    task unknown ("unknown lm-eval task 'copa_local'")."""
    folder = tmp_path / 'my "data" \\ here'
    folder.mkdir()
    (folder / "tasks").symlink_to(DATA / "tasks")
    assert check_tasks(["copa_local"], data_dir_path=folder) == ["copa_local"]
