"""Recipe validation: every kind of bad input fails with one line naming the key and the fix,
before any model is loaded."""

from pathlib import Path

import pytest
import yaml

from prune import PruneError
from prune.pipeline.orchestrator import preflight
from prune.pipeline.recipe import Recipe, load_recipe

from conftest import DATA, WIKI_RAW, tiny_recipe


def write(tmp_path, data) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def error_of(tmp_path, data, overrides=()) -> str:
    with pytest.raises(PruneError) as info:
        load_recipe(write(tmp_path, data), overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_good_recipe_round_trips(tmp_path, tiny_folder):
    recipe = load_recipe(write(tmp_path, tiny_recipe(tiny_folder, tmp_path / "out")))
    assert isinstance(recipe, Recipe) and recipe.select.n_layers == 2
    again = Recipe.model_validate(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe


def test_unknown_key_names_valid_keys(tmp_path, tiny_folder):
    data = tiny_recipe(tiny_folder, tmp_path / "out")
    data["select"]["n_layyers"] = 3
    message = error_of(tmp_path, data)
    assert "unknown key 'select.n_layyers'; did you mean 'select.n_layers'?" in message and "fraction" in message
    data = tiny_recipe(tiny_folder, tmp_path / "out", pruning={"x": 1})
    message = error_of(tmp_path, data)
    assert "unknown key 'pruning'" in message and "did you mean" not in message  # nothing close: no guess


@pytest.mark.parametrize("section, key, value, expected", [
    ("select", "n_layers", "seven", "'select.n_layers'"),
    ("select", "fraction", 1.5, "'select.fraction'"),
    ("select", "strategy", "magic", "'select.strategy'"),
    ("select", "metric", "loss", "'select.metric'"),
    ("calibration", "n_samples", 0, "'calibration.n_samples'"),
    ("score", "positions", "middle", "'score.positions'"),
    ("score", "tau", 2, "'score.tau'"),
    ("model", "dtype", "float8", "unknown dtype 'float8'"),
    ("model", "dtype", "Automatic", "unknown dtype 'Automatic'"),
    # a misspelt device or an unreadable size was read as no cap at all
    ("model", "max_memory", {"CPU": "16GiB"}, "key 'CPU' is not a device"),
    ("model", "max_memory", {"cpu": "garbage"}, "max_memory['cpu']='garbage' is not a size"),
])
def test_wrong_types_and_values(tmp_path, tiny_folder, section, key, value, expected):
    data = tiny_recipe(tiny_folder, tmp_path / "out")
    data.setdefault(section, {})[key] = value
    assert expected in error_of(tmp_path, data)


def test_max_memory_that_nothing_would_read_and_an_absent_device(tmp_path, tiny_folder):
    """max_memory with in-memory scoring and no device map capped nothing (the model loaded whole); an
    absent device in a score command's plan was "only 0 B is available on cuda:0"."""
    from prune.pipeline.execution import plan_execution

    data = tiny_recipe(tiny_folder, tmp_path / "out", score={"execution": "in_memory"})
    data["model"]["max_memory"] = {"cpu": "1GiB"}
    assert "with score.execution: in_memory and no device_map nothing would cap the load" in error_of(tmp_path, data)
    data["model"]["device_map"] = "auto"
    load_recipe(write(tmp_path, data))
    data["model"]["max_memory"] = {"cuda:0": "1GiB", "1": "2GiB", "cpu": "4GiB"}  # Accelerate takes GPU indices only
    assert load_recipe(write(tmp_path, data)).model.max_memory == {0: "1GiB", 1: "2GiB", "cpu": "4GiB"}
    with pytest.raises(PruneError, match="device_map 'cuda:7' names a device that is not present"):
        plan_execution(tiny_folder, "sequential", device_map="cuda:7")


def test_amount_must_be_one_of_count_or_fraction(tmp_path, tiny_folder):
    data = tiny_recipe(tiny_folder, tmp_path / "out")
    data["select"]["fraction"] = 0.25
    assert "exactly one of n_layers" in error_of(tmp_path, data)


def test_missing_required_and_missing_files(tmp_path, tiny_folder):
    data = tiny_recipe(tiny_folder, tmp_path / "out")
    del data["model"]
    assert "missing required key 'model'" in error_of(tmp_path, data)
    data = tiny_recipe(tiny_folder, tmp_path / "out")
    data["calibration"]["path"] = str(tmp_path / "nowhere.txt")
    assert "'calibration.path' file not found" in error_of(tmp_path, data)
    data["calibration"]["path"] = "<local>/wiki.test.raw"  # a published run folder's recipe.yaml
    assert "by file name only (<local>/wiki.test.raw" in (msg := error_of(tmp_path, data))
    assert msg.endswith("give the file with --set calibration.path=PATH")
    data = tiny_recipe(tmp_path / "no-model", tmp_path / "out")
    assert "'model.source'" in error_of(tmp_path, data)
    with pytest.raises(PruneError, match="recipe not found"):
        load_recipe(tmp_path / "absent.yaml")
    (tmp_path / "a-folder.yaml").mkdir()  # it said "recipe not found" for a path that exists
    with pytest.raises(PruneError, match="a-folder.yaml is a folder, not a recipe: give a recipe's YAML file"):
        load_recipe(tmp_path / "a-folder.yaml")
    assert "not valid YAML at line 2" in error_of(tmp_path, "model:\n  source: : bad\n")


def test_overrides_and_env(tmp_path, tiny_folder, monkeypatch):
    data = tiny_recipe(tiny_folder, tmp_path / "out")
    data["calibration"]["path"] = "${MY_DATA:-" + str(WIKI_RAW) + "}"
    recipe = load_recipe(write(tmp_path, data), ["select.n_layers=3", "evaluate.tasks=[arc_easy, piqa]",
                                                 "model.device_map=null"])
    assert recipe.select.n_layers == 3 and recipe.evaluate.tasks == ["arc_easy", "piqa"]
    assert recipe.calibration.path == str(WIKI_RAW)
    monkeypatch.setenv("MY_DATA", "")  # set but empty: the default, as ${MY_DATA:-...} is in a shell
    assert load_recipe(write(tmp_path, data)).calibration.path == str(WIKI_RAW)
    monkeypatch.setenv("MY_DATA", str(tmp_path / "elsewhere.txt"))
    assert "file not found" in error_of(tmp_path, data) and "default" not in error_of(tmp_path, data)
    # a missing file that is a variable's default names the variable to set (SMOLLM2_GGUF unset: "check the path")
    missing = dict(data, model={"source": "${MY_GGUF:-" + str(tmp_path / "absent.gguf") + "}"})
    monkeypatch.delenv("MY_GGUF", raising=False)
    assert error_of(tmp_path, missing).endswith(
        "GGUF file not found: " + str(tmp_path / "absent.gguf") + " (check the path); that is ${MY_GGUF}'s default, "
        "as MY_GGUF is unset or empty (export MY_GGUF=...)")
    # the variable whose default the path is, not one whose default is a part of it (or of the recipe's name)
    missing["model"] = {"source": "${MY_DIR:-" + str(tmp_path) + "}/absent.gguf"}
    missing["evaluate"] = {"perplexity": {"path": "${MY_PPL:-" + str(tmp_path / "absent.txt") + "}"}}
    missing["select"] = dict(missing["select"], n_layers="${MY_K:-2}")
    assert error_of(tmp_path, missing).endswith("that is ${MY_DIR}'s default, as MY_DIR is unset or empty "
                                                "(export MY_DIR=...)")
    missing["model"] = data["model"]
    missing["calibration"] = dict(data["calibration"], path=str(WIKI_RAW))
    assert "'evaluate.perplexity.path' file not found" in error_of(tmp_path, missing)
    assert error_of(tmp_path, missing).endswith("that is ${MY_PPL}'s default, as MY_PPL is unset or empty "
                                                "(export MY_PPL=...)")
    # a Hub id that is a variable's default (out-of-core.yaml's Llama-3.1-70B), unreachable offline: found at
    # pre-flight, after the recipe loaded, and the variable named there too (it said only "could not connect")
    from prune.pipeline.orchestrator import preflight

    monkeypatch.delenv("MY_MODEL", raising=False)
    hub = dict(data, model={"source": "${MY_MODEL:-someorg/absent-model}"}, output={"dir": str(tmp_path / "o")},
               calibration=dict(data["calibration"], path=str(WIKI_RAW)))
    with pytest.raises(PruneError, match=r"could not read the config of someorg/absent-model: .*that is \$\{MY_MODEL\}'s "
                                         r"default, as MY_MODEL is unset or empty \(export MY_MODEL=\.\.\.\)$"):
        preflight(load_recipe(write(tmp_path, hub)))
    assert "is not key=value" in error_of(tmp_path, tiny_recipe(tiny_folder, tmp_path / "o"), ["select.n_layers"])
    assert "'select.n_layers'" in error_of(tmp_path, tiny_recipe(tiny_folder, tmp_path / "o"), ["select.n_layers=many"])
    # a --set value uses ${VAR} as the file's values do (prune heal's --set did; prune run's wrote a folder named
    # '${OUTROOT}'), and replaces a value whose variable is unset (that was refused before the --set applied)
    monkeypatch.delenv("MY_DATA")
    monkeypatch.setenv("OUTROOT", str(tmp_path / "roots"))
    assert load_recipe(write(tmp_path, data), ["output.dir=${OUTROOT}/x"]).output.dir == str(tmp_path / "roots" / "x")
    data["calibration"]["path"] = "${MY_UNSET_DATA}"
    assert load_recipe(write(tmp_path, data), [f"calibration.path={WIKI_RAW}"]).calibration.path == str(WIKI_RAW)
    message = error_of(tmp_path, data)
    assert "uses ${MY_UNSET_DATA} but it is not set" in message and "recipe.yaml" in message
    assert "--set output.dir uses ${MY_UNSET_DATA} but it is not set" in error_of(
        tmp_path, data, [f"calibration.path={WIKI_RAW}", "output.dir=${MY_UNSET_DATA}/x"])


def test_preflight_checks_layer_counts_context_tasks_and_output(tmp_path, tiny_folder):
    def check(**changes):
        data = tiny_recipe(tiny_folder, tmp_path / "out")
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            data[section][key] = value
        preflight(load_recipe(write(tmp_path, data)))

    with pytest.raises(PruneError, match="cannot remove 8 of 8 blocks"):
        check(select__n_layers=8)
    with pytest.raises(PruneError, match="only 6 of 8 are not protected"):
        check(select__n_layers=7)
    with pytest.raises(PruneError, match="out of range for 8 blocks"):
        check(select__protect=[0, 12])
    with pytest.raises(PruneError, match="longer than the model's context \\(512"):
        check(calibration__seq_len=1024)
    with pytest.raises(PruneError, match="unknown lm-eval task 'arc_eazy'.*did you mean arc_easy"):
        check(evaluate__tasks=["arc_eazy"], evaluate__data_dir=str(WIKI_RAW.parent.parent))
    (tmp_path / "out").mkdir()
    with pytest.raises(PruneError, match=r"already exists.*pass overwrite=True"):  # from Python: the parameter
        check()


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path, monkeypatch, smollm2_path):
    """The offline recipes resolve their data and model here; the GPU ones name Hub models and
    datasets and validate as written (they run where the Hub is reachable)."""
    monkeypatch.setenv("SMOLLM2_GGUF", str(smollm2_path))
    monkeypatch.setenv("PRUNE_DATA_DIR", str(DATA))
    monkeypatch.chdir(path.parents[1])
    recipe = load_recipe(path)
    assert recipe.output.dir.startswith("runs/")
    if "smollm2" not in path.name and "out-of-core" not in path.name:
        assert recipe.model.source.count("/") == 1 and recipe.model.device_map == "auto"
        assert recipe.model.dtype == "bfloat16" and recipe.evaluate.tasks


def test_heal_text_from_another_split_of_the_same_dataset_is_allowed(tiny_folder, tmp_path):
    data = tiny_recipe(tiny_folder, tmp_path / "out")
    data["evaluate"]["perplexity"] = {"path": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "split": "test"}
    data["heal"] = {"method": "lora", "data": {"path": "Salesforce/wikitext", "config": "wikitext-2-raw-v1",
                                               "split": "train"}}
    assert load_recipe(write(tmp_path, data)).heal.data.split == "train"
    data["heal"]["data"]["split"] = "test"
    assert "'heal.data' overlaps the perplexity text" in error_of(tmp_path, data)


def test_a_wrong_heal_method_lists_every_method_and_rows_say_how_to_quote(tmp_path, tiny_folder):
    """The method list left out distill (accepted); an unquoted rows value's fix named a made-up slice, not how to
    quote one on the command line."""
    data = tiny_recipe(tiny_folder, tmp_path / "o")
    data["heal"] = {"method": "fo", "data": {"path": str(WIKI_RAW)}}
    assert "'heal.method': 'fo' is not a healing method: use one of lora, replace, partial, bridge, distill" in error_of(tmp_path, data)
    data.pop("heal")
    message = error_of(tmp_path, data, ["calibration.rows=10:50"])
    assert "YAML read the unquoted value as 650" in message and "--set \"SECTION.rows='0:2000'\"" in message


def test_a_cka_batch_larger_than_the_calibration_windows_is_refused_before_loading(tmp_path, tiny_folder):
    """score.cka_windows above calibration.n_samples failed only once the model had loaded (prune.score's check),
    naming the Python argument."""
    data = tiny_recipe(tiny_folder, tmp_path / "o")
    data["score"] = {"cka_windows": data["calibration"]["n_samples"] + 1}
    assert "score.cka_windows" in error_of(tmp_path, data) and "calibration.n_samples" in error_of(tmp_path, data)


def test_a_saved_recipe_under_prune_data_dir_names_the_variable_to_export(monkeypatch):
    """A run made with PRUNE_DATA_DIR set records its data paths under ${PRUNE_DATA_DIR}; prune heal of that folder
    without it said 'export PRUNE_DATA_DIR=... or write ${PRUNE_DATA_DIR:-default}': an edit of a saved run file."""
    from prune.pipeline.recipe import saved_recipe

    monkeypatch.delenv("PRUNE_DATA_DIR")
    with pytest.raises(PruneError) as info:
        saved_recipe({"calibration": {"path": "${PRUNE_DATA_DIR}/wikitext2_raw/wiki.test.raw"}}, "run/recipe.yaml")
    assert str(info.value) == ("run/recipe.yaml records its data paths under ${PRUNE_DATA_DIR} (the run had it set), "
                               "which is not set here: export PRUNE_DATA_DIR=... (the data folder, e.g. ../shared/data), "
                               "as for the run")
