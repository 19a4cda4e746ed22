"""The Hub, the Trainer way: ``TrainingArguments(push_to_hub=True, hub_model_id=...)`` with
``KENCallback`` pushes the subnetwork (report, model card, tokenizer) into ``ken/`` of the
Trainer's repository, and it loads back by repo id with ``subfolder=`` and ``revision=``,
online and then offline from the cache; ``ken push`` publishes a folder; the model card's
metadata parses.

A real (small) Trainer run of the packaged MiniLM, through the real huggingface_hub client,
against a fake Hub endpoint on 127.0.0.1 (``fake_hub.py``, here with branches and commits
that can be read back by their id)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
import yaml

from fake_hub import FakeHub, huggingface_hub_at, run_against_hub
from ken_hf import KENCallback, KENConfig
from ken_hf.config import CONFIG_NAME
from ken_hf.storage.card import model_card
from ken_hf.storage.subnetwork_file import SUBNETWORK_NAME, SubnetworkReader

REPO = "me/minilm-run"
BRANCH = "ken-run"
# The packaged base's id on the Hub: the run's base is the packaged folder, and a pushed
# subnetwork names its base by Hub id (KENCallback(hub_base_model=...)).
BASE_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
SAMPLES = ["a gripping, beautifully acted film", "dull and far too long", "it was fine"]


class RevisionHub(FakeHub):
    """``FakeHub`` with branches (``create_branch``, commits to a branch) and every commit
    readable by its id. ``repos`` and ``commits`` hold the main branch, as in FakeHub."""

    def __init__(self) -> None:
        super().__init__()
        self.branches: dict[tuple[str, str], dict[str, bytes]] = {}
        self.heads: dict[tuple[str, str], str] = {}
        self.snapshots: dict[str, dict[str, bytes]] = {}

    def _files(self, repo: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        revision = unquote(revision)
        if repo not in self.repos:
            return None
        if revision == "main":
            return self.commits[repo], self.repos[repo]
        if (repo, revision) in self.branches:
            return self.heads[repo, revision], self.branches[repo, revision]
        if revision in self.snapshots:
            return revision, self.snapshots[revision]
        return None

    def _serve(self, handler, head: bool) -> None:
        path = unquote(handler.path.split("?")[0])
        self.requests.append(f"{handler.command} {path}")
        info = re.fullmatch(r"/api/models/(.+?)/revision/([^/]+)", path)
        tree = re.fullmatch(r"/api/models/(.+?)/tree/([^/]+)(/.*)?", path)
        resolve = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
        match = info or tree or resolve
        found = self._files(match.group(1), match.group(2)) if match else None
        if found is None:
            return self._send(handler, 404, b"{}", {"X-Error-Code": "RepoNotFound"}, head)
        sha, files = found
        if info:
            siblings = [{"rfilename": name} for name in sorted(files)]
            payload = {"id": match.group(1), "sha": sha, "siblings": siblings}
            return self._json(handler, 200, payload, head)
        if tree:
            entries = [
                {"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                for n, d in sorted(files.items())
            ]
            return self._json(handler, 200, entries, head)
        filename = resolve.group(3)
        if filename not in files:
            return self._not_found(handler, head)
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{hashlib.sha1(files[filename]).hexdigest()}"',
            "Content-Type": "application/octet-stream",
        }
        return self._send(handler, 200, files[filename], headers, head)

    def _post(self, handler) -> None:
        path = unquote(handler.path.split("?")[0])
        branch = re.fullmatch(r"/api/models/(.+?)/branch/([^/]+)", path)
        commit = re.fullmatch(r"/api/models/(.+?)/commit/([^/]+)", path)
        if branch:
            self.requests.append(f"POST {path}")
            handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
            repo, name = branch.groups()
            if (repo, name) in self.branches:
                return self._json(handler, 409, {"error": "branch exists"})
            self.branches[repo, name] = dict(self.repos[repo])
            self.heads[repo, name] = self.commits[repo]
            return self._json(handler, 200, {})
        if commit and unquote(commit.group(2)) != "main":
            self.requests.append(f"POST {path}")
            body = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
            repo, name = commit.group(1), unquote(commit.group(2))
            files = self.branches[repo, name]
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = _decoded(item["value"]["content"])
            sha = hashlib.sha1(json.dumps(sorted(files)).encode() + body).hexdigest()
            self.heads[repo, name] = sha
            self.snapshots[sha] = dict(files)
            url = f"{self.url}/{repo}/commit/{sha}"
            return self._json(handler, 200, {"commitUrl": url, "commitOid": sha})
        super()._post(handler)
        if commit:  # main: keep the commit readable by its id too
            repo = commit.group(1)
            self.snapshots[self.commits[repo]] = dict(self.repos[repo])


def _decoded(content: str) -> bytes:
    return base64.b64decode(content)


def _run(script: str, endpoint: str, home: Path, *, offline: bool = False) -> dict:
    """``run_against_hub``, and the JSON the script printed last."""
    printed = run_against_hub(script, endpoint, home, offline=offline)
    return json.loads(printed.strip().splitlines()[-1])


def _load_script(loads: dict[str, dict]) -> str:
    """A script that loads, for each label, the model and tokenizer with those keyword
    arguments, and prints the logits on ``SAMPLES`` and a pipeline's labels. The base is
    the packaged MiniLM folder, named by the caller: the subnetwork records a local folder,
    which a subnetwork from the Hub may not choose itself."""
    return f"""
    import json, torch
    from transformers import AutoTokenizer, pipeline
    from ken_hf import AutoKENModelForSequenceClassification
    from ken_hf.experiments.assets import minilm_path
    out = {{}}
    for label, kwargs in {loads!r}.items():
        source = kwargs.pop("source")
        model = AutoKENModelForSequenceClassification.from_pretrained(
            source, base_model_name_or_path=minilm_path(), **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        inputs = tokenizer({SAMPLES!r}, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
        pipe = pipeline("text-classification", model=model.base_model, tokenizer=tokenizer)
        out[label] = {{
            "logits": logits.tolist(),
            "labels": [p["label"] for p in pipe({SAMPLES!r})],
        }}
    print(json.dumps(out))
    """


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One Trainer run with ``push_to_hub=True`` (to branch ``BRANCH``) and KENCallback;
    the fake Hub stays up for the module's tests."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from ken_hf.experiments.assets import minilm_path
    from ken_hf.experiments.metrics import classification_metrics
    from ken_hf.experiments.tasks import movie_review_splits

    root = tmp_path_factory.mktemp("hub-trainer")
    base = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(base)
    train, dev = movie_review_splits(tokenizer, train_size=32, eval_size=32, max_length=32)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    args = TrainingArguments(
        output_dir=str(root / "run"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=32,
        max_steps=2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        push_to_hub=True,
        hub_model_id=REPO,
        hub_private_repo=True,
        hub_revision=BRANCH,
    )
    callback = KENCallback(keep_ratio=0.5, dataset="rotten_tomatoes", hub_base_model=BASE_HUB_ID)
    with RevisionHub() as hub, huggingface_hub_at(hub.url, root / "hf-home" / "hub"):
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=dev,
            data_collator=DataCollatorWithPadding(tokenizer),
            processing_class=tokenizer,
            compute_metrics=classification_metrics("accuracy"),
            callbacks=[callback],
        )
        trainer.train()
        pruned = trainer.model.eval()
        inputs = tokenizer(SAMPLES, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = pruned(**inputs).logits.tolist()
        yield {
            "hub": hub,
            "home": root / "hf-home",
            "folder": Path(args.output_dir) / "ken",
            "trainer": trainer,
            "callback": callback,
            "logits": logits,
            "root": root,
            "base": base,
        }


def test_the_trainer_pushes_subnetwork_report_card_and_tokenizer_into_ken(run):
    hub = run["hub"]
    assert REPO in hub.repos
    pushed = hub.branches[REPO, BRANCH]
    expected = {
        CONFIG_NAME,
        SUBNETWORK_NAME,
        "config.json",
        "README.md",
        "ken_report.json",
        "ken_summary.png",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert {f"ken/{name}" for name in expected} <= set(pushed), sorted(pushed)
    assert not any(name.startswith("ken/") for name in hub.repos[REPO])  # main untouched
    for name in expected - {CONFIG_NAME, "README.md"}:  # what was pushed is the local copy
        assert pushed[f"ken/{name}"] == (run["folder"] / name).read_bytes(), name
    # ... but for the base, named by its Hub id there and by its folder here
    local = json.loads((run["folder"] / CONFIG_NAME).read_text())
    remote = json.loads(pushed[f"ken/{CONFIG_NAME}"])
    assert remote["base_model_name_or_path"] == BASE_HUB_ID
    assert local["base_model_name_or_path"] == run["base"]
    assert {**remote, "base_model_name_or_path": run["base"]} == local
    assert any(r.endswith(f"/branch/{BRANCH}") for r in hub.requests)


def test_the_card_front_matter_parses_and_has_the_fields(run):
    card = run["hub"].branches[REPO, BRANCH]["ken/README.md"].decode()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "ken-hf"
    assert {"ken", "pruning"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0"  # from the packaged base's own README.md
    assert meta["pipeline_tag"] == "text-classification"
    assert meta["base_model"] == BASE_HUB_ID  # the pushed card names the Hub id
    local = (run["folder"] / "README.md").read_text()
    assert "base_model" not in yaml.safe_load(local.split("---\n")[1])  # a local folder
    (index,) = meta["model-index"]
    results = index["results"][0]
    assert results["dataset"]["type"] == "rotten_tomatoes"
    report = json.loads((run["folder"] / "ken_report.json").read_text())
    accuracy = next(m for m in results["metrics"] if m["type"] == "accuracy")
    assert accuracy["value"] == pytest.approx(report["metrics_after"]["ken_after_accuracy"])
    body = card.split("---\n", 2)[2]
    assert "keep ratio 0.5" in body and "## Metrics" in body and "```python" in body
    assert "the same tensors in full" in body
    assert "![What KEN kept" in body and "(ken_summary.png)" in body
    assert run["hub"].branches[REPO, BRANCH]["ken/ken_summary.png"].startswith(b"\x89PNG")


def test_loads_back_by_repo_id_subfolder_and_revision_then_offline(run):
    hub, home = run["hub"], run["home"]
    sha = hub.heads[REPO, BRANCH]
    loads = {
        "branch": {"source": REPO, "subfolder": "ken", "revision": BRANCH},
        "commit": {"source": REPO, "subfolder": "ken", "revision": sha},
    }
    online = _run(_load_script(loads), hub.url, home)
    seen = len(hub.requests)
    offline = _run(_load_script(loads), hub.url, home, offline=True)
    assert hub.requests[seen:] == []  # from the cache alone
    for results in (online, offline):
        for label in loads:
            assert results[label]["logits"] == run["logits"], label
            assert results[label]["labels"] == online["branch"]["labels"]


def test_ken_push_publishes_a_folder_that_loads_by_repo_id_alone(run):
    hub, home = run["hub"], run["home"]
    script = f"""
    import json
    from ken_hf.cli import main
    code = main(["push", {str(run["folder"])!r}, "me/minilm-ken", "--private",
                 "--base-model", {BASE_HUB_ID!r}])
    print(json.dumps({{"code": code}}))
    """
    assert _run(script, hub.url, home) == {"code": 0}
    assert "ken_subnetwork.safetensors" in hub.repos["me/minilm-ken"]
    pushed = json.loads(hub.repos["me/minilm-ken"][CONFIG_NAME])
    assert pushed["base_model_name_or_path"] == BASE_HUB_ID
    loaded = _run(_load_script({"root": {"source": "me/minilm-ken"}}), hub.url, home)
    assert loaded["root"]["logits"] == run["logits"]


def test_a_local_folder_takes_subfolder_too(run, capsys):
    from transformers import AutoModelForSequenceClassification

    from ken_hf import AutoKENModelForSequenceClassification, KENModel, KENSubnetwork
    from ken_hf.cli import main as ken
    from ken_hf.making.from_checkpoints import inspect_subnetwork

    root = run["folder"].parent
    model = AutoKENModelForSequenceClassification.from_pretrained(root, subfolder="ken")
    subnetwork = KENSubnetwork.from_pretrained(run["folder"])
    assert model.subnetwork.config == subnetwork.config
    assert KENConfig.from_pretrained(root, subfolder="ken") == subnetwork.config
    base = AutoModelForSequenceClassification.from_pretrained(
        subnetwork.config.base_model_name_or_path, num_labels=2
    )
    wrapped = KENModel.from_pretrained(base, root, subfolder="ken")
    wrapped.load_subnetwork(root, "again", subfolder="ken")
    assert wrapped.subnetworks["again"].config == subnetwork.config
    assert inspect_subnetwork(root, subfolder="ken")["keep_ratio"] == 0.5
    assert ken(["inspect", str(root), "--subfolder", "ken", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["folder"] == str(run["folder"])
    with pytest.raises(FileNotFoundError, match="subfolder"):
        KENSubnetwork.from_pretrained(root, subfolder="nope")
    with pytest.raises(ValueError, match="subfolder"):
        KENSubnetwork.from_pretrained(root, subfolder="../run")


def test_a_failed_push_says_the_local_copy_is_safe_and_where(run, tmp_path):
    from huggingface_hub import constants

    dead = FakeHub()  # never started, and its port closed: every connection is refused
    dead.server.server_close()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "ENDPOINT", dead.url)
        with pytest.raises(OSError) as error:
            run["callback"].push_subnetwork(run["trainer"], run["folder"])
    message = str(error.value)
    assert str(run["folder"]) in message and "safe" in message and "ken push" in message
    assert f"--base-model {BASE_HUB_ID}" in message  # the command that retries names it
    assert (run["folder"] / SUBNETWORK_NAME).is_file()


def test_the_card_links_a_hub_base_with_its_revision_and_license(run, tmp_path):
    """A base named by a Hub id: ``base_model`` in the metadata, a link with the revision,
    and the license read from the base's README.md in the Hub cache (never downloaded)."""
    from huggingface_hub import constants

    base, revision = "sentence-transformers/all-MiniLM-L6-v2", "c" * 40
    cache = tmp_path / "hub"
    snapshot = cache / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: mit\n---\n# the base\n")
    config = KENConfig(
        keep_ratio=0.5,
        base_model_name_or_path=base,
        base_model_revision=revision,
        model_class="BertForSequenceClassification",
    )
    report = json.loads((run["folder"] / "ken_report.json").read_text())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(cache))
        with SubnetworkReader(run["folder"] / SUBNETWORK_NAME) as reader:
            card = model_card(config, reader.facts(), report=report)
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == base and meta["license"] == "mit"
    assert "model-index" not in meta  # no data set named
    assert f"https://huggingface.co/{base}/tree/{revision}" in card


def test_save_pretrained_takes_a_tokenizer_and_refuses_anything_else(run, tmp_path):
    subnetwork, tokenizer = run["callback"].subnetwork, run["trainer"].processing_class
    subnetwork.save_pretrained(tmp_path / "with", tokenizer=tokenizer)
    assert (tmp_path / "with" / "tokenizer.json").is_file()
    assert "AutoTokenizer.from_pretrained" in (tmp_path / "with" / "README.md").read_text()
    subnetwork.save_pretrained(tmp_path / "without")
    assert not (tmp_path / "without" / "tokenizer.json").exists()
    assert "AutoTokenizer" not in (tmp_path / "without" / "README.md").read_text()
    with pytest.raises(TypeError, match="tokenizer="):
        subnetwork.save_pretrained(tmp_path / "bad", tokenizer=object())
    assert not (tmp_path / "bad").exists()
