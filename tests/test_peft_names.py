"""Names PEFT users know, and a subnetwork that travels.

- ``adapter_name=`` where PEFT takes it (``KENModel.from_pretrained``, ``load_subnetwork``,
  ``AutoKENModel*.from_pretrained``), PEFT's adapter methods as aliases of the subnetwork
  ones, transformers' own PEFT methods refused with a ``KENError`` naming what to use, one
  line of what a subnetwork keeps (``print_kept_values``), and short reprs.
- A subnetwork whose base is a local folder is not pushed (API, ``ken push``, the callback
  with ``push_to_hub=True``, when training begins) unless the base's Hub id is named; named,
  the pushed copy records it and loads from the Hub alone.
- ``ken demo --help`` shows every option's default; the demo ends with its table and the
  two lines that load what it saved, and prints no raw log dicts.

Real objects throughout: the packaged MiniLM and a real fine-tune of it (``minilm_finetune``,
conftest.py), and the real huggingface_hub client against the fake Hub of ``fake_hub.py``.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification

from fake_hub import FakeHub, huggingface_hub_at
from ken_hf import (
    AutoKENModelForSequenceClassification,
    KENConfig,
    KENConfigError,
    KENError,
    KENModel,
    KENSubnetwork,
    prune_model,
)
from ken_hf.cli import build_parser
from ken_hf.cli import main as ken
from ken_hf.config import CONFIG_NAME
from ken_hf.modeling import UnknownSubnetworkError
from ken_hf.storage.card import card_metadata
from ken_hf.storage.subnetwork_file import SUBNETWORK_NAME

BASE_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the packaged MiniLM's Hub id


def _base(path: str) -> torch.nn.Module:
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.fixture(scope="module")
def pruned(minilm_finetune, tmp_path_factory):
    """The fine-tuned MiniLM pruned at keep ratios 0.25 and 0.5: for each, the subnetwork
    (in memory), its folder (naming the packaged base folder) and the pruned model's state."""
    results = {}
    root = tmp_path_factory.mktemp("peft-names")
    for ratio in (0.25, 0.5):
        model = copy.deepcopy(minilm_finetune["model"])
        config = KENConfig(keep_ratio=ratio, base_model_name_or_path=minilm_finetune["base"])
        subnetwork = prune_model(
            model,
            _base(minilm_finetune["base"]),
            config,
            new_tensors=minilm_finetune["new"],
            progress=False,
        )
        folder = root / f"ken-{ratio}"
        subnetwork.save_pretrained(folder, tokenizer=minilm_finetune["tokenizer"])
        results[ratio] = {"subnetwork": subnetwork, "folder": folder, "state": _state(model)}
    return results


# -- adapter_name -------------------------------------------------------------------------
def test_adapter_name_names_the_subnetwork_where_peft_takes_it(minilm_finetune, pruned):
    base_path, folder = minilm_finetune["base"], pruned[0.25]["folder"]
    model = KENModel.from_pretrained(_base(base_path), folder, adapter_name="sst2")
    assert list(model.subnetworks) == ["sst2"] and model.active_adapter == "sst2"
    assert model.active_adapters == ["sst2"] and model.active_subnetwork == "sst2"
    model.load_subnetwork(pruned[0.5]["folder"], adapter_name="half")
    model.set_subnetwork("half")
    assert _same(_state(model.base_model), pruned[0.5]["state"])

    auto = AutoKENModelForSequenceClassification.from_pretrained(folder, adapter_name="imdb")
    assert auto.active_adapter == "imdb" and list(auto.subnetworks) == ["imdb"]
    # Neither given: "default", as before and as PEFT names its first adapter.
    assert KENModel.from_pretrained(_base(base_path), folder).active_adapter == "default"
    same = KENModel.from_pretrained(
        _base(base_path), folder, subnetwork_name="x", adapter_name="x"
    )
    assert same.active_adapter == "x"


def test_a_name_given_twice_differently_or_not_at_all_is_refused(minilm_finetune, pruned):
    base_path, folder = minilm_finetune["base"], pruned[0.25]["folder"]
    with pytest.raises(KENConfigError, match="subnetwork_name='a' and adapter_name='b'"):
        KENModel.from_pretrained(_base(base_path), folder, subnetwork_name="a", adapter_name="b")
    with pytest.raises(KENConfigError, match="subnetwork_name='a' and adapter_name='b'"):
        AutoKENModelForSequenceClassification.from_pretrained(
            folder, subnetwork_name="a", adapter_name="b"
        )
    model = KENModel(_base(base_path))
    with pytest.raises(KENConfigError, match="name='a' and adapter_name='b'"):
        model.load_subnetwork(folder, "a", adapter_name="b")
    with pytest.raises(KENConfigError, match="adapter_name="):
        model.load_subnetwork(folder)
    with pytest.raises(KENConfigError, match="non-empty string"):
        model.load_subnetwork(folder, adapter_name="")
    assert model.subnetworks == {}


def test_the_active_subnetwork_is_not_replaced_under_its_name(minilm_finetune, pruned):
    model = KENModel.from_pretrained(_base(minilm_finetune["base"]), pruned[0.25]["folder"])
    with pytest.raises(KENConfigError, match="delete_subnetwork\\('default'\\)"):
        model.load_adapter(pruned[0.5]["folder"], "default")
    assert _same(_state(model.base_model), pruned[0.25]["state"])
    model.delete_adapter("default")  # then the name is free
    model.load_adapter(pruned[0.5]["folder"], "default")
    model.set_adapter("default")
    assert _same(_state(model.base_model), pruned[0.5]["state"])


# -- PEFT's adapter methods ---------------------------------------------------------------
def test_peft_adapter_methods_switch_as_the_subnetwork_methods(minilm_finetune, pruned):
    base = _base(minilm_finetune["base"])
    original = _state(base)
    model = KENModel(base)
    model.load_adapter(pruned[0.25]["folder"], "quarter")
    model.load_adapter(pruned[0.5]["folder"], adapter_name="half")
    assert model.active_adapter is None and model.active_adapters == []
    for name, ratio in [("half", 0.5), ("quarter", 0.25)]:
        model.set_adapter(name)
        assert model.active_adapter == name
        assert _same(_state(base), pruned[ratio]["state"])
    with model.disable_adapter():
        assert model.active_adapter is None
        assert _same(_state(base), original)
    assert model.active_adapter == "quarter"
    assert _same(_state(base), pruned[0.25]["state"])

    with pytest.raises(UnknownSubnetworkError, match="no subnetwork named 'third'") as error:
        model.set_adapter("third")
    assert isinstance(error.value, KENError) and isinstance(error.value, KeyError)
    assert str(error.value).startswith("no subnetwork")  # not quoted, as KeyError would
    with pytest.raises(KENConfigError, match="one name"):
        model.set_adapter(["half", "quarter"])
    with pytest.raises(UnknownSubnetworkError, match="'nope'"):
        model.delete_adapter(["half", "nope"])
    assert sorted(model.subnetworks) == ["half", "quarter"]  # none deleted
    model.delete_adapter(["quarter"])  # the active one: taken off first
    assert model.active_adapter is None and _same(_state(base), original)
    assert list(model.subnetworks) == ["half"]


METHODS = {  # transformers' PEFT method -> (arguments, the ken-hf method its error names)
    "add_adapter": ((), "load_adapter"),
    "enable_adapters": ((), "set_adapter"),
    "disable_adapters": ((), "disable_adapter()"),
    "get_adapter_state_dict": ((), "save_pretrained"),
    "enable_peft_hotswap": ((), "set_adapter"),
}


@pytest.mark.parametrize("method", METHODS)
def test_transformers_peft_methods_name_the_ken_method_instead(minilm_finetune, pruned, method):
    model = KENModel.from_pretrained(_base(minilm_finetune["base"]), pruned[0.25]["folder"])
    arguments, instead = METHODS[method]
    if method == "add_adapter":  # a real PEFT config, which transformers would inject
        peft = pytest.importorskip("peft")
        arguments = (peft.LoraConfig(r=4, target_modules=["query"]),)
    with pytest.raises(KENError) as error:
        getattr(model, method)(*arguments)
    message = str(error.value)
    assert f"KENModel.{method}" in message and instead in message
    assert not any(type(m).__module__.startswith("peft.") for m in model.modules())
    assert _same(_state(model.base_model), pruned[0.25]["state"])


# -- one line of what it keeps ------------------------------------------------------------
LINE = re.compile(
    r"kept values: ([\d,]+) \|\| pruned values: ([\d,]+) \|\| kept%: ([\d.]+) \|\| "
    r"stored whole: ([\d,]+) \|\| file: (.+)"
)


def _figures(line: str) -> tuple[int, int, float, int, str]:
    match = LINE.fullmatch(line)
    assert match, line
    kept, pruned_values, share, whole, size = match.groups()

    def number(text: str) -> int:
        return int(text.replace(",", ""))

    return number(kept), number(pruned_values), float(share), number(whole), size


def test_print_kept_values_is_one_line_of_the_subnetworks_own_counts(
    minilm_finetune, pruned, capsys
):
    folder = pruned[0.25]["folder"]
    model = AutoKENModelForSequenceClassification.from_pretrained(folder)
    capsys.readouterr()
    model.print_kept_values()
    model.print_trainable_parameters()  # PEFT's name: the same line
    model.subnetwork.print_kept_values()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0] == lines[1] == lines[2]
    kept, pruned_values, share, whole, size = _figures(lines[0])

    loaded = model.subnetwork
    counts = loaded.counts()  # from the file's header
    assert (kept, pruned_values, whole) == (
        counts["kept_values"],
        counts["pruned_values"],
        counts["whole_values"],
    )
    assert share == pytest.approx(100 * loaded.kept_fraction(), abs=5e-5)
    assert kept + whole == loaded.kept_values()  # no grown rows here
    file_bytes = (folder / SUBNETWORK_NAME).stat().st_size
    assert loaded.stored_bytes() == file_bytes
    assert size == f"{file_bytes / 2**20:.2f} MiB"

    # The subnetwork made in memory: the same counts from its tensors, no file yet.
    in_memory = pruned[0.25]["subnetwork"]
    assert in_memory.counts() == counts and in_memory.stored_bytes() is None
    assert _figures(in_memory.kept_summary())[:4] == (kept, pruned_values, share, whole)
    assert in_memory.kept_summary().endswith("file: not saved")
    # A KENModel with none active has nothing to print, and says so.
    with model.disable_adapter(), pytest.raises(KENError, match="no active subnetwork"):
        model.print_kept_values()


# -- short reprs --------------------------------------------------------------------------
def test_reprs_are_short_and_say_what_matters(minilm_finetune, pruned):
    subnetwork = KENSubnetwork.from_pretrained(pruned[0.25]["folder"])
    counts = subnetwork.counts()
    text = repr(subnetwork)
    assert len(text) < 500 and "\n" not in text, text
    assert text.startswith("KENSubnetwork(") and "keep_ratio=0.25" in text
    assert f"{counts['pruned_tensors']} pruned + {counts['whole_tensors']} whole" in text
    assert f"kept {subnetwork.kept_fraction():.1%}" in text
    assert repr(pruned[0.25]["subnetwork"]) == text  # the same, decoded or not
    assert "tensor(" not in text

    config = subnetwork.config
    shown = repr(config)
    assert len(shown) < 500 and shown.startswith("KENConfig(keep_ratio=0.25")
    assert f"model_class={config.model_class!r}" in shown
    assert "rule=" not in shown and "seed=" not in shown and "k=None" not in shown  # defaults
    many = KENConfig(k=8, target_modules=[f"layer.{i}.query" for i in range(10_000)],
                     base_model_name_or_path="/" + "very-long-folder/" * 200)  # fmt: skip
    assert len(repr(many)) < 500 and repr(many).startswith("KENConfig(k=8, target_modules=[")

    model = KENModel(_base(minilm_finetune["base"]))
    model.load_adapter(pruned[0.25]["folder"], "quarter")
    model.load_adapter(pruned[0.5]["folder"], "half")
    assert "subnetworks: ['half', 'quarter'], none active" in repr(model)
    model.set_adapter("half")
    printed = repr(model)
    lines = printed.splitlines()
    assert lines[0] == "KENModel[BertForSequenceClassification]("
    assert lines[1] == "  subnetworks: ['half', 'quarter'], active: 'half'"
    assert lines[2] == f"  half: {model.subnetwork!r}"
    assert "  (model): BertForSequenceClassification(" in lines  # the module tree, as before
    assert len(printed) < len(repr(model.base_model)) + 1000 and "tensor(" not in printed
    model.unload()
    assert "unloaded" in repr(model).splitlines()[1]


# -- a subnetwork that travels ------------------------------------------------------------
def _uploads(hub: FakeHub) -> list[str]:
    """The requests that created a repository or sent files."""
    return [r for r in hub.requests if r.startswith("POST ") and "validate-yaml" not in r]


def test_a_local_base_is_not_pushed_and_the_error_says_how_to_name_it(
    minilm_finetune, pruned, tmp_path, capsys
):
    folder = pruned[0.25]["folder"]
    subnetwork = KENSubnetwork.from_pretrained(folder)
    model = KENModel.from_pretrained(_base(minilm_finetune["base"]), folder)
    with FakeHub() as hub, huggingface_hub_at(hub.url, tmp_path / "hub"):
        for push in (subnetwork.push_to_hub, model.push_to_hub):
            with pytest.raises(KENConfigError) as error:
                push("me/minilm-ken")
            message = str(error.value)
            assert "me/minilm-ken" in message and "local path" in message
            assert "base_model_name_or_path='owner/name'" in message
            assert "--base-model" in message
        with pytest.raises(KENConfigError, match="base_model_name_or_path='../up'"):
            subnetwork.push_to_hub("me/minilm-ken", base_model_name_or_path="../up")
        capsys.readouterr()
        assert ken(["push", str(folder), "me/minilm-ken"]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("ken push: error: ") and "--base-model" in line
        assert _uploads(hub) == [] and hub.repos == {}
    assert subnetwork.config.base_model_name_or_path == minilm_finetune["base"]


def test_naming_the_hub_base_pushes_a_copy_that_records_it_and_loads_from_the_hub(
    minilm_finetune, pruned, tmp_path, capsys
):
    folder = pruned[0.25]["folder"]
    local = {p.name: p.read_bytes() for p in folder.iterdir()}
    base_folder = Path(minilm_finetune["base"])
    with FakeHub() as hub, huggingface_hub_at(hub.url, tmp_path / "hub"):
        hub.add_repo(BASE_HUB_ID, {p.name: p.read_bytes() for p in base_folder.iterdir()
                                   if p.is_file()})  # fmt: skip
        subnetwork = KENSubnetwork.from_pretrained(folder)
        subnetwork.push_to_hub("me/api", base_model_name_or_path=BASE_HUB_ID)
        assert ken(["push", str(folder), "me/cli", "--base-model", BASE_HUB_ID]) == 0
        assert "pushed: " in capsys.readouterr().out
        loaded = {
            repo: AutoKENModelForSequenceClassification.from_pretrained(repo)  # no base named
            for repo in ("me/api", "me/cli")
        }
    # The local folder and the subnetwork in memory are left as they were.
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == local
    assert subnetwork.config.base_model_name_or_path == str(base_folder)
    for repo in ("me/api", "me/cli"):
        pushed = hub.repos[repo]
        config = json.loads(pushed[CONFIG_NAME])
        assert config["base_model_name_or_path"] == BASE_HUB_ID
        saved = json.loads(local[CONFIG_NAME])
        assert {k: v for k, v in config.items() if k != "base_model_name_or_path"} == {
            k: v for k, v in saved.items() if k != "base_model_name_or_path"
        }
        meta = yaml.safe_load(pushed["README.md"].decode().split("---\n")[1])
        assert meta["base_model"] == BASE_HUB_ID
        assert _same(_state(loaded[repo].base_model), pruned[0.25]["state"])
    # ken push sends the folder's own files, the subnetwork byte for byte, and a card that
    # keeps what the saved one said (the base's license) and its loading code.
    cli = hub.repos["me/cli"]
    assert set(cli) == set(local)
    assert cli[SUBNETWORK_NAME] == local[SUBNETWORK_NAME]
    assert cli["tokenizer.json"] == local["tokenizer.json"]
    saved_meta = card_metadata(folder / "README.md")
    assert "license" in saved_meta and meta["license"] == saved_meta["license"]
    assert "AutoTokenizer.from_pretrained" in cli["README.md"].decode()


def test_the_callback_refuses_a_local_base_push_when_training_begins(minilm_finetune, tmp_path):
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from ken_hf import KENCallback
    from ken_hf.experiments.tasks import movie_review_splits

    with pytest.raises(KENConfigError, match="hub_base_model="):
        KENCallback(keep_ratio=0.5, hub_base_model="not/a/hub/id")
    tokenizer = minilm_finetune["tokenizer"]
    train, _ = movie_review_splits(tokenizer, train_size=16, eval_size=16, max_length=16)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=8,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        push_to_hub=True,
        hub_model_id="me/minilm-run",
    )
    with FakeHub() as hub, huggingface_hub_at(hub.url, tmp_path / "hub"):
        trainer = Trainer(
            model=_base(minilm_finetune["base"]),  # loaded from the packaged folder
            args=args,
            train_dataset=train,
            data_collator=DataCollatorWithPadding(tokenizer),
            callbacks=[KENCallback(keep_ratio=0.5)],
        )
        with pytest.raises(KENConfigError) as error:
            trainer.train()
        commits = [r for r in hub.requests if "/commit/" in r or "/preupload/" in r]
    message = str(error.value)
    assert "me/minilm-run" in message and "hub_base_model='owner/name'" in message
    assert trainer.state.global_step == 0  # refused before a single step
    assert commits == [] and not (tmp_path / "run" / "ken").exists()


# -- ken demo --help, and the demo's end ------------------------------------------------
def _option_help(text: str) -> dict[str, str]:
    """``{option: its help, whitespace collapsed}`` from an argparse help's options."""
    entries: dict[str, str] = {}
    current = None
    for line in text.split("options:", 1)[1].splitlines():
        found = re.match(r"^  (-{1,2}[\w-]+)", line)
        if found:
            current = found.group(1)
            entries[current] = line
        elif current and line.startswith("   "):
            entries[current] += " " + line
    return {name: " ".join(help_.split()) for name, help_ in entries.items()}


def test_ken_demo_help_documents_every_option_with_its_default(monkeypatch, capsys):
    from ken_hf.experiments.run_settings import DemoSettings

    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as done:
        ken(["demo", "--help"])
    assert done.value.code == 0
    helps = _option_help(capsys.readouterr().out)
    demo = build_parser("demo")._subparsers._group_actions[0].choices["demo"]
    options = [a for a in demo._actions if a.option_strings and a.dest != "help"]
    assert len(options) == len(helps) - 1  # all of them, and -h
    defaults = DemoSettings()
    for action in options:
        name = action.option_strings[0]
        text = helps[name]
        metavar = action.metavar or action.dest.upper()
        described = text.removeprefix(f"{name} {metavar}").strip()
        assert described and "(default" in described, name
        if action.default is not None:  # the value the option really defaults to
            assert f"(default: {action.default}" in described, name
            assert action.default == getattr(defaults, action.dest)


def test_every_option_of_every_command_has_help_that_names_its_default():
    parser = build_parser()
    for name, command in parser._subparsers._group_actions[0].choices.items():
        for action in command._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"ken {name} {action.option_strings[0]}: no help"
            if action.default is not None and action.nargs != 0:
                text = command.formatter_class("ken")._expand_help(action)
                assert "default" in text, f"ken {name} {action.option_strings[0]}: {text}"


def test_the_demo_ends_with_its_table_and_the_two_lines_that_load_what_it_saved(
    pruned, tmp_path
):
    from ken_hf.experiments.demo import log_rows, summary_lines

    folder = tmp_path / "run" / "ken"
    shutil.copytree(pruned[0.25]["folder"], folder)
    logs = [{"loss": 0.5 + i / 7, "grad_norm": 1.0, "epoch": i} for i in range(3)]
    logs += [{"train_loss": 0.61, "train_runtime": 3.0}]
    logs += [{"ken_before_loss": 0.43, "ken_before_accuracy": 0.8}, {"ken_after_loss": 0.47}]
    rows = log_rows(logs)
    assert rows == [
        ("training loss, first / last logged step", f"{logs[0]['loss']:.4f} / "
                                                    f"{logs[2]['loss']:.4f}"),
        ("training loss, whole run", f"{logs[3]['train_loss']:.4f}"),
        ("held-out loss, full fine-tune / after KEN", f"{logs[4]['ken_before_loss']:.4f} / "
                                                      f"{logs[5]['ken_after_loss']:.4f}"),
    ]  # fmt: skip
    assert log_rows([{"eval_runtime": 1.0}]) == []
    everything = [("kept", "75.0%"), *rows]
    lines = summary_lines("KEN demo", everything, folder)
    table = [line for line in lines if line.startswith("  ")]
    assert [line.split()[0] for line in table] == [label.split()[0] for label, _ in everything]
    starts = {line.index(value) for line, (_, value) in zip(table, everything, strict=True)}
    assert len(starts) == 1  # the values in one column
    assert not any(line.lstrip().startswith("{") for line in lines)
    imports, load = lines[-2:]
    assert imports == "from ken_hf import AutoKENModelForSequenceClassification"
    assert load == f'model = AutoKENModelForSequenceClassification.from_pretrained("{folder}")'
    namespace: dict = {}
    exec(f"{imports}\n{load}\n", namespace)  # the printed lines load what was saved
    assert _same(_state(namespace["model"].base_model), pruned[0.25]["state"])


def test_a_small_demo_prints_no_raw_log_dicts(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    import ken_hf.viz
    from ken_hf.experiments.demo import run_demo
    from ken_hf.experiments.run_settings import DemoSettings

    # The KENviz report (half a minute of drawing, tested in test_viz.py) is not what this
    # test is about: its path is printed all the same.
    monkeypatch.setattr(ken_hf.viz, "write_report", lambda subnetwork, out: Path(out) / "r.html")

    settings = DemoSettings(
        train_size=16, eval_size=16, epochs=1, batch_size=8, max_length=16,
        output_dir=str(tmp_path / "demo"),
    )  # fmt: skip
    result = run_demo(settings)
    printed = capsys.readouterr().out.splitlines()
    assert not [line for line in printed if line.strip().startswith("{")], printed
    assert any(line.strip().startswith("training loss, whole run") for line in printed)
    assert any(line.strip().startswith("held-out loss, full fine-tune / after KEN")
               for line in printed)  # fmt: skip
    assert any(line.strip().endswith(str(tmp_path / "demo" / "kenviz" / "r.html"))
               for line in printed)  # fmt: skip
    assert printed[-2:] == [
        "from ken_hf import AutoKENModelForSequenceClassification",
        f'model = AutoKENModelForSequenceClassification.from_pretrained("{result["folder"]}")',
    ]
