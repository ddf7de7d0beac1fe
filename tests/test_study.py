"""The study driver: which models it runs, in which order, with which options, what it skips, and
its errors; against a stand-in run.sh that records its calls, and once for real on the small
recipe (a finished model skipped, a conversion of it made, decoded, scored and profiled)."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import ASR_EXP, FAST_DECODING, TINY, copy_recipe

# Records each call; a dry run reports 0 outputs left for models whose exp dir holds "finished",
# a real run of stages 5-10 finishes the model (or fails for a model named "broken").
STAND_IN_RUN_SH = textwrap.dedent("""\
    #!/usr/bin/env python3
    import json, os, sys
    args = sys.argv[1:]
    with open("calls.jsonl", "a") as f:
        f.write(json.dumps({"args": args, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\\n")
    opts = dict(zip(args[::2], args[1::2]))
    exp = os.path.join(opts["--expdir"], "asr_" + opts.get("--asr_tag", ""))
    if opts.get("--dry_run") == "true":
        print("Dry run: %d output(s) to make or redo" % (0 if os.path.exists(exp + "/finished") else 3))
    elif opts.get("--stage") == "5":
        if opts["--asr_tag"] == "broken":
            sys.exit("training failed")
        os.makedirs(exp, exist_ok=True)
        open(exp + "/finished", "w").close()
""")


@pytest.fixture
def recipe_dir(tmp_path):
    (tmp_path / "run.sh").write_text(STAND_IN_RUN_SH)
    (tmp_path / "run.sh").chmod(0o755)
    (tmp_path / "conf").mkdir()
    for name in ("a", "b"):
        (tmp_path / "conf" / f"{name}.yaml").write_text("encoder: conformer_x\n")
    return tmp_path


def write_study(folder: Path, models: dict) -> None:
    (folder / "conf" / "study.yaml").write_text(yaml.safe_dump({"models": models}))


def study(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "espnet_plugin.recipe.study", *args], cwd=folder,
                          capture_output=True, text=True, timeout=300)


def calls(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "calls.jsonl").read_text().splitlines()]


def trained(folder: Path) -> list[str]:
    return [dict(zip(c["args"][::2], c["args"][1::2]))["--asr_tag"] for c in calls(folder)
            if "5" in c["args"] and "true" not in c["args"]]


MODELS = {
    "mha": {"asr_config": "conf/a.yaml"},
    "mla": {"asr_config": "conf/b.yaml"},
    "mha2mla": {"finetune_from": "mha", "convert_args": "--target mla", "finetune_epochs": 2},
}


def test_runs_what_is_not_done_in_order_and_skips_what_is(recipe_dir):
    write_study(recipe_dir, MODELS)
    (recipe_dir / "exp" / "asr_mla").mkdir(parents=True)
    (recipe_dir / "exp" / "asr_mla" / "finished").write_text("")
    result = study(recipe_dir, "--", "--test_sets", "test")
    assert result.returncode == 0, result.stderr
    assert trained(recipe_dir) == ["mha", "mha2mla"]  # mla is done; the conversion after its source
    finetune = next(c["args"] for c in calls(recipe_dir) if "mha2mla" in c["args"] and "5" in c["args"])
    options = dict(zip(finetune[::2], finetune[1::2]))
    assert options["--finetune_from"] == "exp/asr_mha"
    assert options["--convert_args"] == "--target mla" and options["--finetune_epochs"] == "2"
    assert options["--test_sets"] == "test"  # what follows -- goes to every run.sh call
    assert calls(recipe_dir)[0]["args"][:6] == ["--expdir", "exp", "--stage", "1", "--stop_stage", "3"]
    assert calls(recipe_dir)[-1]["args"][2:6] == ["--stage", "11", "--stop_stage", "11"]
    assert "mla" in result.stdout and "left: " in result.stdout

    again = study(recipe_dir, "--dry_run")  # a re-run: everything is done
    assert again.returncode == 0
    status = again.stdout.split("status:")[1]
    assert status.count("done") == 3


def test_a_subset_brings_the_model_it_starts_from(recipe_dir):
    write_study(recipe_dir, MODELS)
    assert study(recipe_dir, "--models", "mha2mla").returncode == 0
    assert trained(recipe_dir) == ["mha", "mha2mla"]


def test_models_share_out_the_gpus(recipe_dir):
    write_study(recipe_dir, {"m1": {"asr_config": "conf/a.yaml"},
                             "m2": {"asr_config": "conf/b.yaml"}})
    assert study(recipe_dir, "--jobs", "2", "--gpus", "0,1").returncode == 0
    gpus = {c["gpu"] for c in calls(recipe_dir) if "5" in c["args"] and "true" not in c["args"]}
    assert gpus == {"0", "1"}
    runs = [c["args"] for c in calls(recipe_dir) if "5" in c["args"] and "true" not in c["args"]]
    assert all(args[-2:] == ["--ngpu", "1"] for args in runs)


def test_a_failure_stops_only_what_depends_on_it(recipe_dir):
    write_study(recipe_dir, {"broken": {"asr_config": "conf/a.yaml"},
                             "after": {"finetune_from": "broken"},
                             "other": {"asr_config": "conf/b.yaml"}})
    result = study(recipe_dir)
    assert result.returncode == 1
    assert "2 model(s) failed: broken, after" in result.stderr
    assert trained(recipe_dir) == ["broken", "other"]


@pytest.mark.parametrize("models, args, message", [
    (MODELS, ["--models", "mha,gqa"], "--models: gqa not in conf/study.yaml"),
    ({"x": {"asr_config": "conf/missing.yaml"}}, [], "asr_config conf/missing.yaml does not exist"),
    ({"x": {"finetune_from": "y"}}, [], "finetune_from y is not a model of the study"),
    ({"x": {"asr_config": "conf/a.yaml", "finetune_from": "x"}}, [], "give either asr_config"),
    ({}, [], "expected 'models:' mapping"),
])
def test_bad_studies_are_named(recipe_dir, models, args, message):
    write_study(recipe_dir, models)
    result = study(recipe_dir, *args)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (recipe_dir / "calls.jsonl").exists()


def test_outside_a_recipe_folder(tmp_path):
    result = study(tmp_path)
    assert result.returncode == 1 and "no run.sh here" in result.stderr


def test_the_study_on_the_small_recipe(recipe, tmp_path, pytestconfig):
    """The session's finished tiny model is found done; its decoder converted to GQA (no
    fine-tuning) is made, decoded, scored and profiled; the report covers both."""
    work = copy_recipe(recipe, tmp_path / "asr1", ignore=())
    tag = ASR_EXP.removeprefix("exp/asr_")
    (work / "conf" / "study.yaml").write_text(yaml.safe_dump({"models": {
        tag: {"asr_config": TINY},
        "tiny_gqa": {"finetune_from": tag, "finetune_epochs": 0,
                     "convert_args": "--target gqa --n_kv_heads 1 --no_wer --calib_utts 4"},
    }}))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        ["bash", "run_study.sh", "--", "--test_sets", "test", "--inference_args", FAST_DECODING,
         "--local_data_opts", f"--download_dir {pytestconfig.cache.mkdir('asterisk_downloads')}"],
        cwd=work, capture_output=True, text=True, timeout=1800, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    status = result.stdout.split("status:")[1].split("started")[0]
    assert re.search(rf"{tag} +done", status)
    assert re.search(r"tiny_gqa +to do \(\d+ outputs missing or stale\)", status), status
    assert f"started {tag}" not in result.stdout and "started tiny_gqa" in result.stdout
    decoded = next((work / "exp/asr_tiny_gqa").glob("decode_*/test"))
    assert (decoded / "score_word/result.json").is_file()
    stats = json.loads((decoded / "profile/decode_stats.json").read_text())
    assert stats["kv_cache"]["ratio_to_mha_analytic"] < 1  # GQA's cache against MHA's
    assert "tiny_gqa" in (work / "exp/report/RESULTS.md").read_text()


def test_seeds_make_one_model_each_and_fine_tune_from_the_same_seed(recipe_dir, monkeypatch):
    from espnet_plugin.recipe.study import load_study

    monkeypatch.chdir(recipe_dir)
    write_study(recipe_dir, {
        "a": {"asr_config": "conf/a.yaml", "seeds": [0, 1], "asr_args": "--max_epoch 2"},
        "a_ft": {"finetune_from": "a", "finetune_epochs": 1},
        "b": {"asr_config": "conf/b.yaml"},
    })
    models = {m.name: m for m in load_study(Path("conf/study.yaml"), None)}
    assert list(models) == ["a_seed0", "a_seed1", "a_ft_seed0", "a_ft_seed1", "b"]
    assert models["a_seed1"].run_options("exp") == [
        "--asr_tag", "a_seed1", "--asr_args", "--max_epoch 2 --seed 1",
        "--asr_config", "conf/a.yaml"]  # yaml.safe_dump sorts the keys
    assert models["a_ft_seed1"].source == "a_seed1"
    assert "exp/asr_a_seed1" in models["a_ft_seed1"].run_options("exp")
    assert models["b"].run_options("exp") == ["--asr_tag", "b", "--asr_config", "conf/b.yaml"]
    selected = [m.name for m in load_study(Path("conf/study.yaml"), ["a_ft"])]
    assert selected == ["a_seed0", "a_ft_seed0", "a_seed1", "a_ft_seed1"]


@pytest.mark.parametrize("seeds", [[], [0, 0], [-1], ["0"], 3, [True]])
def test_a_bad_seeds_value_names_the_entry_and_key(recipe_dir, monkeypatch, seeds):
    from espnet_plugin.cli import UserError
    from espnet_plugin.recipe.study import load_study

    monkeypatch.chdir(recipe_dir)
    write_study(recipe_dir, {"a": {"asr_config": "conf/a.yaml", "seeds": seeds}})
    with pytest.raises(UserError, match=r"conf/study.yaml: model a: seeds must be"):
        load_study(Path("conf/study.yaml"), None)


def test_fine_tuned_seeds_must_be_seeds_of_the_source(recipe_dir, monkeypatch):
    from espnet_plugin.cli import UserError
    from espnet_plugin.recipe.study import load_study

    monkeypatch.chdir(recipe_dir)
    write_study(recipe_dir, {"a": {"asr_config": "conf/a.yaml", "seeds": [0, 1]},
                             "ft": {"finetune_from": "a", "seeds": [2]}})
    with pytest.raises(UserError, match="model ft: seeds \\[2\\] are not all seeds"):
        load_study(Path("conf/study.yaml"), None)


def test_the_seeds_of_a_model_are_trained_with_their_seed_and_share_its_statistics(recipe_dir):
    write_study(recipe_dir, {"a": {"asr_config": "conf/a.yaml", "seeds": [0, 1]}})
    assert study(recipe_dir).returncode == 0
    made = calls(recipe_dir)
    stats = [c for c in made if c["args"][2:6] == ["--stage", "4", "--stop_stage", "4"]]
    assert len(stats) == 1
    trained = {c["args"][c["args"].index("--asr_tag") + 1]: c["args"] for c in made
               if c["args"][2:4] == ["--stage", "5"] and "--dry_run" not in c["args"]}
    assert set(trained) == {"a_seed0", "a_seed1"}
    assert trained["a_seed1"][trained["a_seed1"].index("--asr_args") + 1] == "--seed 1"
