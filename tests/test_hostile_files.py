"""Every subnetwork folder is untrusted input: hostile files are refused cleanly, quickly, in
bounded memory, without touching anything outside their folder and without running code.

Each case builds one hostile folder from a valid one (the catalogue below), opens it through
one entry point, and checks:

- the outcome: a refusal (``KENError`` or ``OSError``; ``UnsafePathError`` for a symbolic
  link out of the folder) whose message names the file and the tensor or field at fault;
  for the CLI, exit code 2 and exactly one line ``ken <command>: error: ...`` on stderr (any
  other exception escaping ``ken_hf.cli.main`` is a bug); positive controls must succeed,
  and a loaded model must give the logits of the model in memory;
- time: a refusal comes within a second of calling the entry point (the call alone is
  timed, in the child process);
- memory: the call runs under an address-space limit (``RLIMIT_AS``) of the process's size
  plus 1.5 GiB, about twice what the real subnetworks need; a hostile size that is believed
  ends in ``MemoryError``, which is a failure;
- nothing outside the folder is read or written: every file beside the folder (and the
  folder itself) keeps its bytes and mtime, nothing is created there (only the output
  folder and the case's Hub cache may be written), the files a case protects in the output
  folder survive, and no output holds data read through a link (a link points at a file
  that would be *accepted* if followed, so a refusal proves it was not followed);
- no code runs and nothing prompts: the marker file that a base's custom code would write
  does not exist, and no ``trust_remote_code`` prompt was printed.

Entry points: ``AutoKENModelForSequenceClassification.from_pretrained(folder)``,
``KENSubnetwork.from_pretrained(folder)`` and then every tensor it holds (they are decoded on
first use: a refusal may come then, as a user would meet it),
``KENConfig.from_pretrained(folder)``, ``KENModel.from_pretrained(base_model, folder)``
(the base preloaded, its weights in memory) and ``ken inspect / apply / viz``
(``ken_hf.cli.main``). Hub cases publish the folder to the fake Hub (``fake_hub``: only the
HTTP endpoint is faked) and pass the repository id; the child's Hub cache is in the case's
folder.

Classes (the id of each case starts with its class):

- c0: positive controls, which must load under the same limits: the valid folders, a
  version 1 folder, a folder laid out like the Hub cache (files linked into ``blobs/``), a
  link inside the folder, an interrupted save's ``.previous`` file, a Hub subnetwork with a
  Hub base;
- c1: deleting or overwriting outside the output folder (``ken apply --out``, ``ken viz
  --out``): a stale index naming paths outside, links named like its own files;
- c2: reading outside the folder: files of the folder (or its subfolder) linked outside;
- c3: the file choosing a local base: a Hub subnetwork naming a local folder (absolute,
  relative to the working directory, shadowing a Hub id) or a base revision written like a
  path; base folders and Hub repositories with custom code; and the positive controls (a
  Hub base, a local base the user passes, a local subnetwork naming a local base);
- c4: sizes believed before they are checked: frames, masks and index lists declaring huge
  tensors (and zstd frames whose header claims it), element counts that wrap around, a
  sparse tensor too large to draw densely, headers and configs of tens of MB;
- c5: crashes instead of errors: JSON nested 100,000 deep, wrong JSON types, bad
  ``model_type``, a float64 delta for a float32 tensor, overlapping or gapped byte ranges;
- c6: other checks of the format: NaN statistics, fingerprints that are not hex, control
  characters in tensor names, duplicate JSON keys, index lists out of range, version 1
  files with hostile entries, folders and FIFOs where files should be.

How it runs (``hostile_cases``): one runner process imports torch, transformers and ken_hf
once and forks a child per case; the child sets the memory limit, runs the entry
point and reports as JSON; the runner kills a child that outlives the case's timeout. The
hostile files are written by ``hostile_cases.KenFile``, which recomputes every checksum and
digest, so each case fails only on the property under test.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from transformers import AutoModelForSequenceClassification

from fake_hub import FakeHub
from hostile_cases import (
    DELETE,
    KEN_CONFIG,
    MODEL_CONFIG,
    SUBNETWORK,
    KenFile,
    Runner,
    array_checksum,
    edit_ken_config,
    lying_frame,
    nested,
    read_json,
    with_first_key,
    write_json,
)
from ken_hf import KENConfig, prune_model

V1 = Path(__file__).parent / "data" / "v1"  # a tiny BERT base, its fine-tune, a v1 subnetwork
MEMORY_BUDGET = 3 * 2**29  # 1.5 GiB above the process's size when the case starts
REFUSAL_SECONDS = 1.0
TIMEOUT = 20  # seconds before the runner kills a case
INDEX = "model.safetensors.index.json"
PREVIOUS = f".{SUBNETWORK}.previous"
HUB_BASE = "hostile/tiny-base"  # the tiny base, published on the fake Hub
REVISION = "0123456789abcdef0123456789abcdef01234567"
SECRET = b"hostile-secret-5f1c9a"  # data outside the folder that must not be copied out
# Tensors of the MiniLM subnetwork (k=16 on two modules): Q is stored with a bitmask, D with
# an index list; CW and CB are the new classification head, stored whole.
Q = "bert.encoder.layer.0.attention.self.query.weight"
D = "bert.encoder.layer.1.output.dense.weight"
CW, CB = "classifier.weight", "classifier.bias"
TARGETS = ["layer.0.attention.self.query", "layer.1.output.dense"]
# Custom code of a base folder: importing it writes the marker.
CUSTOM_CODE = """\
from pathlib import Path

Path({marker!r}).write_text("custom code ran")

from transformers import BertConfig, BertForSequenceClassification


class EvilConfig(BertConfig):
    model_type = {model_type!r}


class EvilModel(BertForSequenceClassification):
    config_class = EvilConfig
"""


# -- the valid folders ----------------------------------------------------------------------
@dataclass
class Assets:
    """The valid folders the cases start from, their bases and expected logits."""

    folders: dict[str, Path]  # "minilm", "tiny" (version 2), "v1" (version 1)
    bases: dict[str, str]  # checkpoint folder of each base: "minilm", "tiny"
    input_ids: dict[str, list]
    logits: dict[str, torch.Tensor]


def _logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(input_ids)).logits


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    """A MiniLM subnetwork (two targeted modules of a fine-tune made of small deterministic
    noise, k=16, a new head stored whole), a tiny BERT subnetwork (the version 1 test data's
    pair, pruned today) and the version 1 folder of the test data."""
    from ken_hf.experiments.assets import minilm_path

    root = tmp_path_factory.mktemp("hostile-assets")
    bases = {"minilm": str(minilm_path()), "tiny": str(V1 / "base")}
    input_ids = {"minilm": [[101, 2023, 3185, 2001, 2307, 102]], "tiny": [[1, 5, 9, 2, 7]]}
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(bases["minilm"], num_labels=2)
    tuned = copy.deepcopy(base)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if any(t in name for t in TARGETS) or name.startswith("classifier"):
                parameter.add_(torch.randn(parameter.shape, generator=noise) * 1e-3)
    config = KENConfig(k=16, target_modules=TARGETS)
    prune_model(tuned, base.eval(), config, progress=False).save_pretrained(root / "minilm")
    logits = {"minilm": _logits(tuned.eval(), input_ids["minilm"])}

    tiny = AutoModelForSequenceClassification.from_pretrained(V1 / "finetuned")
    tiny_base = AutoModelForSequenceClassification.from_pretrained(bases["tiny"])
    subnetwork = prune_model(
        tiny, tiny_base, KENConfig(keep_ratio=0.5), new_tensors={CW, CB}, progress=False
    )
    subnetwork.save_pretrained(root / "tiny")
    logits["tiny"] = _logits(tiny.eval(), input_ids["tiny"])
    folders = {"minilm": root / "minilm", "tiny": root / "tiny", "v1": V1 / "ken"}
    kinds = KenFile(folders["minilm"])
    assert kinds.entry(Q)["encoding"] == "mask" and kinds.entry(D)["encoding"] == "indices"
    assert kinds.entry(CW)["kind"] == kinds.entry(CB)["kind"] == "whole"
    return Assets(folders, bases, input_ids, logits)


@pytest.fixture(scope="module")
def hub():
    """The fake Hub, holding the tiny base as ``HUB_BASE``; cases publish their own repos."""
    with FakeHub() as fake:
        fake.repos[HUB_BASE] = {
            name: (V1 / "base" / name).read_bytes() for name in ("config.json", "model.safetensors")
        }
        fake.commits[HUB_BASE] = hashlib.sha1(HUB_BASE.encode()).hexdigest()
        yield fake


@pytest.fixture(scope="module")
def runner(assets, tmp_path_factory):
    process = Runner(assets.bases, tmp_path_factory.mktemp("hostile-runner") / "runner.log")
    yield process
    process.close()


# -- one case -------------------------------------------------------------------------------
@dataclass
class Target:
    """What a case opens: ``folder`` (a path, or a Hub id with ``hub``), the base of a
    ``KENModel`` or ``ken apply`` (``minilm`` or ``tiny``), keyword arguments of the API
    entry point, extra CLI arguments, and the working directory (default: the case root)."""

    folder: str | Path
    base: str | None = None
    kwargs: dict = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    cwd: Path | None = None
    hub: bool = False


class Ctx:
    """A case's folder: ``root/ken`` (usually the folder under attack), ``root/outside``
    (files beside it, which must not change), ``root/out`` (the output folder of apply and
    viz). Helpers build the hostile files; ``protect``, ``when_ok`` and ``secret`` add
    checks."""

    def __init__(self, root: Path, assets: Assets, hub: FakeHub, case: Case) -> None:
        self.root, self.assets, self.fake_hub, self.case = root, assets, hub, case
        self.outside_dir, self.out, self.marker = root / "outside", root / "out", root / "MARKER"
        self.outside_dir.mkdir(parents=True)
        (self.outside_dir / "sentinel.txt").write_text("must stay as it is")
        self.source = "tiny" if case.entry == "apply" else "minilm"
        self.protected: list[Path] = []
        self.ok_checks: list[tuple[str, Callable[[], bool]]] = []
        self.secret: bytes | None = None
        self.hub_requests_at_start = len(hub.requests)

    # building
    def valid(self, source: str | None = None) -> Path:
        """The valid folder ``source`` (default: the case's), read-only."""
        return self.assets.folders[source or self.source]

    def copy(self, source: str | None = None, name: str = "ken") -> Path:
        """A copy of the valid folder ``source`` at ``root/name``."""
        self.source = source or self.source
        return Path(shutil.copytree(self.valid(), self.root / name))

    def outside(self, name: str, data: bytes | str | Path) -> Path:
        """A file beside the folder (``data``: its bytes, text, or a file to copy)."""
        path = self.outside_dir / name
        if isinstance(data, Path):
            shutil.copyfile(data, path)
        else:
            path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def link(self, path: Path, target: str | Path) -> None:
        """Make ``path`` a symbolic link to ``target`` (replacing what is there)."""
        if path.is_symlink() or path.is_file():
            path.unlink()
        os.symlink(target, path)

    def link_outside(self, folder: Path, name: str) -> Path:
        """Copy file ``name`` of ``folder`` beside the folder (a valid copy, which would be
        accepted) and make ``name`` a link to that copy. Returns the copy."""
        copy_path = self.outside(f"copy-of-{name.lstrip('.')}", folder / name)
        self.link(folder / name, os.path.relpath(copy_path, folder))
        return copy_path

    def protect(self, path: Path, data: bytes = b"mine") -> None:
        """A user's file in the output folder that must survive unchanged."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.protected.append(path)

    def when_ok(self, what: str, check: Callable[[], bool]) -> None:
        """A check for when the entry point succeeds."""
        self.ok_checks.append((what, check))

    def publish(self, folder: Path, subfolder: str | None = None, repo: str | None = None) -> str:
        """Publish the files of ``folder`` as a repository of the fake Hub (``repo``,
        default one named after the case); its id."""
        repo = repo or "hostile/" + re.sub(r"[^a-z0-9]+", "-", self.case.id)[-80:].strip("-")
        prefix = f"{subfolder}/" if subfolder else ""
        self.fake_hub.repos[repo] = {
            prefix + p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()
        }
        self.fake_hub.commits[repo] = hashlib.sha1(repo.encode()).hexdigest()
        return repo

    def hub_downloads(self, repo: str) -> list[str]:
        return [
            r
            for r in self.fake_hub.requests[self.hub_requests_at_start :]
            if r.startswith(f"GET /{repo}/resolve/")
        ]

    # running
    def request(self, target: Target) -> dict:
        case, folder = self.case, str(target.folder)
        base = target.base or ("tiny" if self.source in ("tiny", "v1") else "minilm")
        request = {
            "cwd": str(target.cwd or self.root),
            "timeout": TIMEOUT,
            "memory_budget": MEMORY_BUDGET,
            "kwargs": target.kwargs,
        }
        if case.entry in ("config", "subnetwork", "auto", "kenmodel"):
            request.update(entry=case.entry, folder=folder, base=base)
            if case.logits and case.entry in ("auto", "kenmodel"):
                request["input_ids"] = self.assets.input_ids[case.logits]
        else:
            argv = {
                "inspect": ["inspect", folder],
                "viz": ["viz", folder, "--out", str(self.out)],
                "apply": ["apply", "--base", self.assets.bases[base], "--ken", folder],
            }[case.entry]
            if case.entry == "apply":
                argv += ["--out", str(self.out)]
            request.update(entry="cli", argv=argv + target.args)
        if target.hub:
            request["hub"] = {"url": self.fake_hub.url, "cache": str(self.root / "hf-cache")}
        return request

    def snapshot(self) -> dict[str, tuple]:
        """Type, bytes and mtime of everything under the case root but the output folder
        and the Hub cache, and of the protected files."""
        skipped = {self.out, self.root / "hf-cache"}
        paths = []
        for folder, folders, files in os.walk(self.root):
            folders[:] = [f for f in folders if Path(folder, f) not in skipped]
            paths += [Path(folder, name) for name in folders + files]
        state = {}
        for path in paths + self.protected:
            state[str(path)] = _state(path)
        return state


def _state(path: Path) -> tuple:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return ("missing",)
    if stat.S_ISLNK(info.st_mode):
        return ("link", os.readlink(path))
    if stat.S_ISREG(info.st_mode):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return ("file", info.st_size, info.st_mtime_ns, digest)
    return ("dir",) if stat.S_ISDIR(info.st_mode) else ("other", stat.S_IFMT(info.st_mode))


# -- the catalogue --------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """``expect``: ``refused``, ``ok``, ``ok_or_refused`` (either; a refusal as clean and
    quick as any), or ``no_code`` (anything but a hang, a crash of the process, code run
    or a prompt). ``names``: what a refusal's message must name (as whole words); ``errors``:
    the exception classes a refusal may be (any of them in its MRO; API entry points)."""

    id: str
    klass: str
    entry: str
    prepare: Callable[[Ctx], Target | Path | str]
    expect: str
    names: tuple[str | tuple[str, ...], ...]
    errors: tuple[str, ...]
    logits: str | None
    max_seconds: float | None

    def __str__(self) -> str:
        return self.id


CASES: list[Case] = []
REFUSALS = ("KENError", "OSError")
UNSAFE = ("UnsafePathError",)


def case(
    klass: str,
    entries: str,
    *,
    expect: str = "refused",
    names: tuple[str | tuple[str, ...], ...] = (),
    errors: tuple[str, ...] = REFUSALS,
    logits: str | None = None,
    max_seconds: float | None = None,
):
    """Register the decorated ``prepare(ctx)`` as one case per entry point in ``entries``
    (``config subnetwork auto kenmodel inspect viz apply``)."""

    def register(prepare):
        slug = prepare.__name__.strip("_").replace("_", "-")
        for entry in entries.split():
            CASES.append(
                Case(
                    f"{klass}-{slug}-{entry}",
                    klass,
                    entry,
                    prepare,
                    expect,
                    names,
                    errors,
                    logits,
                    max_seconds,
                )
            )
        return prepare

    return register


def _other_save(folder: Path) -> None:
    """Rewrite the folder's subnetwork file as if another save had written it (another
    document, so another digest); ``ken_config.json`` keeps the digest it had."""
    kf = KenFile(folder)
    kf.entry(Q)["delta"] = [0.5, 0.25]
    kf.save(update_config=False)


def _hub_layout(ctx: Ctx, source: Path, entry: str = "models--hostile--ken") -> Path:
    """The files of ``source`` laid out as the Hub cache keeps a snapshot: links
    ``snapshots/<rev>/<name> -> ../../blobs/<sha256>``. Returns the snapshot folder."""
    cache_entry = ctx.root / "hf" / entry
    snapshot = cache_entry / "snapshots" / REVISION
    (cache_entry / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (cache_entry / "refs").mkdir()
    (cache_entry / "refs" / "main").write_text(REVISION)
    for path in sorted(source.iterdir()):
        if path.is_file():
            data = path.read_bytes()
            blob = hashlib.sha256(data).hexdigest()
            (cache_entry / "blobs" / blob).write_bytes(data)
            os.symlink(f"../../blobs/{blob}", snapshot / path.name)
    return snapshot


def _stale_index(ctx: Ctx, weight_map, text: str | None = None) -> None:
    """An index of an earlier checkpoint in the output folder."""
    ctx.out.mkdir(exist_ok=True)
    index = {"metadata": {"total_size": 8}, "weight_map": weight_map}
    (ctx.out / INDEX).write_text(text if text is not None else json.dumps(index))


def _local_base(ctx: Ctx, where: Path, model_type: str = "bert") -> Path:
    """A base folder with custom code (``auto_map``; importing it writes the marker) and the
    tiny base's weights: loadable as it is when ``model_type`` is one transformers knows."""
    where.mkdir(parents=True)
    config = read_json(V1 / "base" / "config.json")
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForSequenceClassification": "modeling_evil.EvilModel",
    }
    write_json(where / "config.json", config)
    shutil.copyfile(V1 / "base" / "model.safetensors", where / "model.safetensors")
    code = CUSTOM_CODE.format(marker=str(ctx.marker), model_type=model_type)
    for module in ("configuration_evil.py", "modeling_evil.py"):
        (where / module).write_text(code)
    return where


def _hub_subnetwork(
    ctx: Ctx, base: str, subfolder: str | None = None, revision: str | None = None
) -> str:
    """The tiny subnetwork, naming ``base`` (at ``revision``) as its base, published on the
    fake Hub."""
    ken = ctx.copy("tiny", name="published")
    edit_ken_config(ken, base_model_name_or_path=base, base_model_revision=revision)
    return ctx.publish(ken, subfolder)


def _zstd(data: bytes, *, content_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(level=1, write_content_size=content_size).compress(data)


def _kept_positions(kf: KenFile, name: str) -> np.ndarray:
    """The kept positions of a pruned tensor (version 2, either encoding)."""
    entry, kept = kf.entry(name), kf.unpacked(name, "kept")
    numel = math.prod(entry["shape"])
    if entry["encoding"] == "mask":
        return np.flatnonzero(np.unpackbits(kept, count=numel, bitorder="little"))
    width = 1 if numel <= 2**8 else 2 if numel <= 2**16 else 4 if numel <= 2**32 else 8
    return kept.view(f"<u{width}").astype(np.int64)


# c0: positive controls ---------------------------------------------------------------------
@case("c0", "auto kenmodel inspect viz", expect="ok", logits="minilm")
def valid_minilm_folder(ctx: Ctx):
    return ctx.copy("minilm")


@case("c0", "auto apply", expect="ok", logits="tiny")
def valid_tiny_folder(ctx: Ctx):
    if ctx.case.entry == "apply":
        ctx.when_ok("apply wrote a checkpoint", lambda: (ctx.out / "model.safetensors").is_file())
    return ctx.copy("tiny")


@case("c0", "kenmodel inspect", expect="ok", logits="tiny")
def version_1_folder(ctx: Ctx):
    return ctx.copy("v1")


@case("c0", "subnetwork", expect="ok")
def previous_version_inside_the_folder(ctx: Ctx):
    ken = ctx.copy()
    shutil.copyfile(ken / SUBNETWORK, ken / PREVIOUS)
    _other_save(ken)
    return ken


@case("c0", "subnetwork", expect="ok")
def link_inside_the_folder(ctx: Ctx):
    ken = ctx.copy()
    (ken / "store").mkdir()
    os.replace(ken / SUBNETWORK, ken / "store" / SUBNETWORK)
    ctx.link(ken / SUBNETWORK, f"store/{SUBNETWORK}")
    return ken


@case("c0", "subnetwork kenmodel inspect", expect="ok", logits="minilm")
def hub_cache_layout(ctx: Ctx):
    return _hub_layout(ctx, ctx.valid("minilm"))


@case("c0", "apply", expect="ok")
def apply_removes_its_own_stale_shards(ctx: Ctx):
    ken = ctx.copy()
    shards = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    _stale_index(ctx, {"a": shards[0], "b": shards[1]})
    for shard in shards:
        (ctx.out / shard).write_bytes(b"an earlier shard")
    ctx.protect(ctx.out / "my_notes.txt")
    ctx.when_ok("stale shards removed", lambda: not any((ctx.out / s).exists() for s in shards))
    return ken


# c1: deleting or overwriting outside the output folder --------------------------------------
def _apply_with_stale_index(ctx: Ctx, weight_map: dict) -> Path:
    ken = ctx.copy()
    _stale_index(ctx, weight_map)
    return ken


@case("c1", "apply", expect="ok_or_refused", names=(INDEX,))
def index_names_a_parent_path(ctx: Ctx):
    ctx.outside("victim.safetensors", b"victim")
    return _apply_with_stale_index(ctx, {"w": "../outside/victim.safetensors"})


@case("c1", "apply", expect="ok_or_refused", names=(INDEX,))
def index_names_an_absolute_path(ctx: Ctx):
    victim = ctx.outside("victim.bin", b"victim")
    return _apply_with_stale_index(ctx, {"w": str(victim)})


@case("c1", "apply", expect="ok_or_refused", names=(INDEX,))
def index_names_a_shard_outside(ctx: Ctx):
    name = "model-00001-of-00002.safetensors"
    ctx.outside(name, b"victim")
    return _apply_with_stale_index(ctx, {"w": f"../outside/{name}"})


@case("c1", "apply", expect="ok_or_refused", names=(INDEX,))
def index_names_a_user_file(ctx: Ctx):
    ctx.protect(ctx.out / "my_notes.txt")
    return _apply_with_stale_index(ctx, {"w": "my_notes.txt"})


@case("c1", "apply", expect="ok_or_refused", names=(INDEX,))
def index_names_a_user_folder(ctx: Ctx):
    ctx.protect(ctx.out / "checkpoint-500" / "model.safetensors")
    return _apply_with_stale_index(ctx, {"w": "checkpoint-500"})


@case("c1", "apply", expect="ok_or_refused", names=(INDEX,))
def index_names_the_parent_folder(ctx: Ctx):
    return _apply_with_stale_index(ctx, {"w": ".."})


@case("c1", "apply", expect="ok_or_refused", names=(INDEX,))
def shard_named_link_to_outside(ctx: Ctx):
    name = "model-00001-of-00002.safetensors"
    ken = _apply_with_stale_index(ctx, {"w": name})
    ctx.outside("victim.safetensors", b"victim")
    ctx.link(ctx.out / name, "../outside/victim.safetensors")
    return ken


@case("c1", "apply", expect="ok_or_refused", names=("model.safetensors",))
def weights_file_link_to_outside(ctx: Ctx):
    ken = ctx.copy()
    ctx.out.mkdir()
    ctx.outside("victim.safetensors", b"victim")
    ctx.link(ctx.out / "model.safetensors", "../outside/victim.safetensors")
    return ken


@case("c1", "apply", expect="ok_or_refused", names=(MODEL_CONFIG,))
def config_file_link_to_outside(ctx: Ctx):
    ken = ctx.copy()
    ctx.out.mkdir()
    ctx.outside("victim.json", b'{"victim": true}')
    ctx.link(ctx.out / MODEL_CONFIG, "../outside/victim.json")
    return ken


@case("c1", "apply", expect="ok_or_refused", names=(INDEX,))
def index_link_to_an_index_outside(ctx: Ctx):
    ken = ctx.copy()
    ctx.out.mkdir()
    ctx.outside("victim.bin", b"victim")
    ctx.outside("index.json", json.dumps({"weight_map": {"w": "../outside/victim.bin"}}))
    ctx.link(ctx.out / INDEX, "../outside/index.json")
    return ken


@case("c1", "apply", expect="ok_or_refused", names=(INDEX,))
def index_a_fifo(ctx: Ctx):
    ken = ctx.copy()
    ctx.out.mkdir()
    os.mkfifo(ctx.out / INDEX)
    return ken


@case("c1", "viz", expect="ok_or_refused", names=("summary.png",))
def picture_link_to_outside(ctx: Ctx):
    ken = ctx.copy()
    ctx.out.mkdir()
    ctx.outside("victim.png", b"victim")
    ctx.link(ctx.out / "summary.png", "../outside/victim.png")
    return ken


# c2: reading outside the folder ----------------------------------------------------------
@case("c2", "subnetwork auto kenmodel inspect viz apply", names=(SUBNETWORK,), errors=UNSAFE)
def subnetwork_file_linked_outside(ctx: Ctx):
    ken = ctx.copy()
    ctx.link_outside(ken, SUBNETWORK)
    return ken


@case("c2", "config auto inspect", names=(KEN_CONFIG,), errors=UNSAFE)
def ken_config_linked_outside(ctx: Ctx):
    ken = ctx.copy()
    ctx.link_outside(ken, KEN_CONFIG)
    return ken


@case("c2", "subnetwork apply", names=(MODEL_CONFIG,), errors=UNSAFE)
def model_config_linked_outside(ctx: Ctx):
    ken = ctx.copy()
    ctx.link_outside(ken, MODEL_CONFIG)
    return ken


@case("c2", "subnetwork inspect", names=(PREVIOUS,), errors=UNSAFE)
def previous_subnetwork_file_linked_outside(ctx: Ctx):
    ken = ctx.copy()
    copy_path = ctx.outside("copy.safetensors", ken / SUBNETWORK)  # what the config names
    _other_save(ken)
    ctx.link(ken / PREVIOUS, os.path.relpath(copy_path, ken))
    return ken


@case("c2", "subnetwork", names=(f".{MODEL_CONFIG}.previous",), errors=UNSAFE)
def previous_model_config_linked_outside(ctx: Ctx):
    ken = ctx.copy()
    shutil.copyfile(ken / SUBNETWORK, ken / PREVIOUS)
    _other_save(ken)
    copy_path = ctx.outside("config-copy.json", ken / MODEL_CONFIG)
    ctx.link(ken / f".{MODEL_CONFIG}.previous", os.path.relpath(copy_path, ken))
    return ken


@case("c2", "apply", names=("tokenizer.json",))
def tokenizer_file_linked_outside(ctx: Ctx):
    ken = ctx.copy()
    (ken / "tokenizer_config.json").write_text("{}")
    ctx.outside("tokenizer.json", b'{"version": "1.0", "secret": "' + SECRET + b'"}')
    ctx.link(ken / "tokenizer.json", "../outside/tokenizer.json")
    ctx.secret = SECRET
    return ken


@case("c2", "apply", names=("tokenizer_config.json",))
def tokenizer_config_linked_outside(ctx: Ctx):
    ken = ctx.copy()
    (ken / "tokenizer.json").write_text("{}")
    ctx.outside("tokenizer_config.json", b'{"secret": "' + SECRET + b'"}')
    ctx.link(ken / "tokenizer_config.json", "../outside/tokenizer_config.json")
    ctx.secret = SECRET
    return ken


@case("c2", "subnetwork", names=(SUBNETWORK,), errors=UNSAFE)
def link_chain_leaving_the_folder(ctx: Ctx):
    ken = ctx.copy()
    copy_path = ctx.link_outside(ken, SUBNETWORK)
    ctx.link(ken / "hop", os.path.relpath(copy_path, ken))
    ctx.link(ken / SUBNETWORK, "hop")
    return ken


@case("c2", "subnetwork", names=(SUBNETWORK,), errors=UNSAFE)
def absolute_link_outside(ctx: Ctx):
    ken = ctx.copy()
    copy_path = ctx.link_outside(ken, SUBNETWORK)
    ctx.link(ken / SUBNETWORK, copy_path.absolute())
    return ken


@case("c2", "subnetwork", names=(SUBNETWORK,), errors=UNSAFE)
def link_through_a_linked_folder(ctx: Ctx):
    ken = ctx.copy()
    (ctx.outside_dir / "store").mkdir()
    shutil.copyfile(ken / SUBNETWORK, ctx.outside_dir / "store" / SUBNETWORK)
    ctx.link(ken / "store", "../outside/store")
    ctx.link(ken / SUBNETWORK, f"store/{SUBNETWORK}")
    return ken


@case("c2", "subnetwork", names=("sub",), errors=UNSAFE)
def subfolder_linked_outside(ctx: Ctx):
    ken = ctx.root / "ken"
    ken.mkdir()
    shutil.copytree(ctx.valid(), ctx.outside_dir / "valid")
    ctx.link(ken / "sub", "../outside/valid")
    return Target(ken, kwargs={"subfolder": "sub"})


@case("c2", "subnetwork", names=(SUBNETWORK,), errors=UNSAFE)
def link_to_a_device(ctx: Ctx):
    ken = ctx.copy()
    ctx.link(ken / SUBNETWORK, "/dev/zero")
    return ken


@case("c2", "subnetwork", names=(SUBNETWORK,), errors=UNSAFE)
def hub_cache_link_into_another_entry(ctx: Ctx):
    snapshot = _hub_layout(ctx, ctx.valid())
    other = _hub_layout(ctx, ctx.valid(), entry="models--hostile--other")
    target = os.path.relpath(os.path.realpath(other / SUBNETWORK), snapshot)
    ctx.link(snapshot / SUBNETWORK, target)
    return snapshot


@case("c2", "subnetwork config", names=(KEN_CONFIG,), errors=UNSAFE)
def hub_cache_link_out_of_the_cache(ctx: Ctx):
    snapshot = _hub_layout(ctx, ctx.valid())
    for name in (SUBNETWORK, KEN_CONFIG):
        copy_path = ctx.outside(name, ctx.valid() / name)
        ctx.link(snapshot / name, os.path.relpath(copy_path, snapshot))
    return snapshot


# c3: the file chooses a local base ------------------------------------------------------
BASE_FIELD = ("base_model_name_or_path",)


@case("c3", "auto", names=BASE_FIELD)
def hub_names_an_absolute_local_base(ctx: Ctx):
    base = _local_base(ctx, ctx.root / "localbase")
    return Target(_hub_subnetwork(ctx, str(base)), hub=True)


@case("c3", "auto", names=BASE_FIELD)
def hub_names_a_base_relative_to_the_working_directory(ctx: Ctx):
    _local_base(ctx, ctx.root / "localbase")
    return Target(_hub_subnetwork(ctx, "localbase"), hub=True)


@case("c3", "auto", names=BASE_FIELD)
def hub_names_a_dot_relative_base(ctx: Ctx):
    _local_base(ctx, ctx.root / "localbase")
    return Target(_hub_subnetwork(ctx, "./localbase"), hub=True)


@case("c3", "auto", names=BASE_FIELD)
def hub_names_a_parent_relative_base(ctx: Ctx):
    _local_base(ctx, ctx.root / "localbase")
    (ctx.root / "work").mkdir()
    return Target(_hub_subnetwork(ctx, "../localbase"), hub=True, cwd=ctx.root / "work")


@case("c3", "auto", names=BASE_FIELD)
def hub_names_a_base_with_custom_code(ctx: Ctx):
    base = _local_base(ctx, ctx.root / "evilbase", model_type="ken-evil")
    return Target(_hub_subnetwork(ctx, str(base)), hub=True)


@case("c3", "auto", names=BASE_FIELD)
def hub_subfolder_names_a_local_base(ctx: Ctx):
    base = _local_base(ctx, ctx.root / "localbase")
    repo = _hub_subnetwork(ctx, str(base), subfolder="ken")
    return Target(repo, hub=True, kwargs={"subfolder": "ken"})


@case("c3", "auto", expect="ok_or_refused", names=BASE_FIELD)
def hub_id_shadowed_by_a_local_folder(ctx: Ctx):
    """The base is a Hub id, and a folder of that name lies in the working directory: it
    must come from the Hub (or be refused), not from the folder."""
    _local_base(ctx, ctx.root / HUB_BASE)
    ctx.when_ok(
        "the base came from the Hub",
        lambda: any(r.endswith("/model.safetensors") for r in ctx.hub_downloads(HUB_BASE)),
    )
    return Target(_hub_subnetwork(ctx, HUB_BASE), hub=True)


@case("c3", "auto", expect="ok_or_refused", names=("base_model_revision",))
def hub_base_revision_leaving_the_cache(ctx: Ctx):
    """A Hub base at a revision written like a path: the Hub client files a revision under
    ``refs/<revision>`` in its cache; nothing may be written outside it."""
    repo = _hub_subnetwork(ctx, HUB_BASE, revision="../../../outside/written-by-revision")
    return Target(repo, hub=True)


@case("c3", "auto", expect="no_code")
def hub_base_with_custom_code(ctx: Ctx):
    """A Hub subnetwork naming a Hub base whose config maps its classes to code in the base
    repository (that would write the marker)."""
    code_repo = _local_base(ctx, ctx.root / "published-base", model_type="ken-evil")
    base = ctx.publish(code_repo, repo="hostile/evil-base-" + ctx.case.entry)
    return Target(_hub_subnetwork(ctx, base), hub=True)


@case("c3", "auto", expect="no_code")
def hub_model_config_maps_remote_code(ctx: Ctx):
    """The subnetwork's own config.json maps the model class to code in another Hub
    repository (``repo--module.Class``)."""
    code_repo = ctx.publish(
        _local_base(ctx, ctx.root / "code", model_type="ken-evil"), repo="hostile/evil-code"
    )
    ken = ctx.copy("tiny", name="published")
    edit_ken_config(ken, base_model_name_or_path=HUB_BASE)
    config = read_json(ken / MODEL_CONFIG)
    config["auto_map"] = {
        "AutoConfig": f"{code_repo}--configuration_evil.EvilConfig",
        "AutoModelForSequenceClassification": f"{code_repo}--modeling_evil.EvilModel",
    }
    write_json(ken / MODEL_CONFIG, config)
    return Target(ctx.publish(ken), hub=True)


@case("c3", "auto", expect="ok", logits="tiny")
def hub_names_a_hub_base(ctx: Ctx):
    return Target(_hub_subnetwork(ctx, HUB_BASE), hub=True)


@case("c3", "auto", expect="ok", logits="tiny")
def hub_local_base_given_by_the_user(ctx: Ctx):
    repo = _hub_subnetwork(ctx, str(ctx.root / "no-such-base"))
    kwargs = {"base_model_name_or_path": ctx.assets.bases["tiny"]}
    return Target(repo, hub=True, kwargs=kwargs)


@case("c3", "auto", expect="ok", logits="tiny")
def local_folder_names_a_local_base(ctx: Ctx):
    ken = ctx.copy("tiny")
    base = shutil.copytree(V1 / "base", ctx.root / "mybase")
    edit_ken_config(ken, base_model_name_or_path=str(base))
    return ken


@case("c3", "auto", expect="no_code")
def local_base_with_custom_code(ctx: Ctx):
    ken = ctx.copy("tiny")
    base = _local_base(ctx, ctx.root / "evilbase", model_type="ken-evil")
    edit_ken_config(ken, base_model_name_or_path=str(base))
    return ken


# c4: sizes believed before they are checked ----------------------------------------------
@case("c4", "subnetwork", names=(SUBNETWORK, CW))
@case("c4", "kenmodel", names=(CW,))  # refused against the model: the folder is the user's
def whole_tensor_frame_declares_3_gib(ctx: Ctx):
    kf = KenFile(ctx.copy())
    kf.entry(CW).update(shape=[786432, 1024], codec="zstd")
    kf.set_array(f"whole.{CW}", _zstd(bytes(range(256)) * 4))
    kf.reseal(CW)
    kf.save()
    return kf.folder


@case("c4", "subnetwork", names=(SUBNETWORK, CW))
def whole_tensor_frame_without_size_declares_3_gib(ctx: Ctx):
    kf = KenFile(ctx.copy())
    kf.entry(CW).update(shape=[786432, 1024], codec="zstd")
    kf.set_array(f"whole.{CW}", _zstd(bytes(range(256)) * 4, content_size=False))
    kf.reseal(CW)
    kf.save()
    return kf.folder


@case("c4", "subnetwork kenmodel", names=(SUBNETWORK, Q))
def bitmask_declares_a_million_by_a_million(ctx: Ctx):
    kf = KenFile(ctx.copy())
    entry = kf.entry(Q)
    entry["shape"] = [10**6, 10**6]
    entry["sizes"][0] = 10**12 // 8
    kf.set_packed(Q, "kept", b"\xff" * 1000)
    kf.reseal(Q)
    kf.save()
    return kf.folder


@case("c4", "subnetwork", names=(SUBNETWORK, D))
def index_list_declares_1e11_positions(ctx: Ctx):
    kf = KenFile(ctx.copy())
    count = 10**11
    kf.entry(D).update(
        shape=[10**6, 10**6], count=count, changed=0, sizes=[count * 8, -(-count // 8), 0]
    )
    kf.set_packed(D, "kept", bytes(1000))
    kf.set_packed(D, "changed", bytes(100))
    kf.set_packed(D, "difference", b"")
    kf.reseal(D)
    kf.save()
    return kf.folder


@case("c4", "viz", expect="ok_or_refused", names=(SUBNETWORK, Q))
def sparse_tensor_of_32_giga_values(ctx: Ctx):
    """A valid index list of a huge, nearly empty tensor (2**35 values, 6144 kept): drawing
    it must not build a dense mask of its declared shape (32 GiB)."""
    kf = KenFile(ctx.copy())
    kept = _kept_positions(kf, Q).astype("<u8").tobytes()
    entry = kf.entry(Q)
    entry.update(shape=[2**17, 2**18], encoding="indices")
    entry["sizes"][0] = len(kept)
    kf.set_packed(Q, "kept", kept)
    kf.reseal(Q)
    kf.save()
    return kf.folder


@case("c4", "subnetwork", names=(SUBNETWORK, CW))
def whole_tensor_frame_header_claims_3_gib(ctx: Ctx):
    """A frame whose header declares exactly the 3 GiB the entry expects, holding 1000
    bytes: the frame's own word about its size is not enough."""
    kf = KenFile(ctx.copy())
    kf.entry(CW).update(shape=[786432, 1024], codec="zstd")
    kf.set_array(f"whole.{CW}", lying_frame(786432 * 1024 * 4))
    kf.reseal(CW)
    kf.save()
    return kf.folder


@case("c4", "subnetwork", names=(SUBNETWORK, Q))
def bitmask_frame_header_claims_4_gib(ctx: Ctx):
    """A bitmask over 2**35 values (4 GiB of bits) in a frame of a few bytes that says so."""
    kf = KenFile(ctx.copy())
    entry = kf.entry(Q)
    entry["shape"] = [2**17, 2**18]
    entry["sizes"][0] = 2**32
    kf.set_array(f"pruned.{Q}.kept", lying_frame(2**32))
    kf.reseal(Q)
    kf.save()
    return kf.folder


@case("c4", "subnetwork", names=(SUBNETWORK, Q))
def pruned_shape_wraps_to_zero_elements(ctx: Ctx):
    kf = KenFile(ctx.copy())
    kf.entry(Q).update(shape=[2**32, 2**32], count=0, changed=0, sizes=[0, 0, 0])
    for part in ("kept", "changed", "difference"):
        kf.set_packed(Q, part, b"")
    kf.reseal(Q)
    kf.save()
    return kf.folder


@case("c4", "subnetwork", names=(SUBNETWORK, CW))
def whole_shape_wraps_to_zero_elements(ctx: Ctx):
    kf = KenFile(ctx.copy())
    kf.entry(CW).update(shape=[2**32, 2**32], codec="zstd")
    kf.set_array(f"whole.{CW}", _zstd(b""))
    kf.reseal(CW)
    kf.save()
    return kf.folder


@case("c4", "subnetwork", names=(SUBNETWORK, Q))
def version_1_shape_wraps_to_zero_elements(ctx: Ctx):
    kf = KenFile(ctx.copy("v1"))
    kf.entry(Q).update(shape=[2**32, 2**32], count=0)
    kf.set_array(f"pruned.{Q}.values", b"", dtype="F32")
    kf.set_array(f"pruned.{Q}.mask", b"")
    kf.reseal(Q)
    kf.save()
    return kf.folder


@case("c4", "subnetwork", names=(SUBNETWORK, CW))
def dimension_past_int64(ctx: Ctx):
    kf = KenFile(ctx.copy())
    kf.entry(CW).update(shape=[2**64], codec="zstd")
    kf.set_array(f"whole.{CW}", _zstd(bytes(8)))
    kf.reseal(CW)
    kf.save()
    return kf.folder


@case("c4", "subnetwork", names=(SUBNETWORK,))
def header_of_72_mb(ctx: Ctx):
    """280,000 empty arrays in the safetensors header (72 MB of JSON)."""
    kf = KenFile(ctx.copy())
    filler = "x" * 200
    pad = "".join(
        f'"pad.{i:06d}.{filler}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}},'
        for i in range(280_000)
    )
    kf.save(header_text=lambda text: "{" + pad + text[1:])
    return kf.folder


@case("c4", "inspect", expect="ok_or_refused", names=(SUBNETWORK,), max_seconds=1.0)
def header_metadata_string_of_72_mb(ctx: Ctx):
    kf = KenFile(ctx.copy())
    kf.metadata["padding"] = "x" * (72 * 2**20)
    kf.save()
    return kf.folder


@case("c4", "config", names=(KEN_CONFIG,))
def ken_config_of_80_mb(ctx: Ctx):
    ken = ctx.copy()
    text = (ken / KEN_CONFIG).read_text()
    (ken / KEN_CONFIG).write_text("{" + " " * (80 * 2**20) + text.lstrip()[1:])
    return ken


# c5: crashes instead of errors ------------------------------------------------------------
@case("c5", "subnetwork inspect", names=(SUBNETWORK,))
def safetensors_header_nested_deep(ctx: Ctx):
    kf = KenFile(ctx.copy())
    kf.save(header_text=lambda text: with_first_key(text, "nest", nested()))
    return kf.folder


@case("c5", "subnetwork", names=(SUBNETWORK,))
def ken_document_nested_deep(ctx: Ctx):
    kf = KenFile(ctx.copy())
    kf.save(document_text=with_first_key(json.dumps(kf.document), "nest", nested()))
    return kf.folder


@case("c5", "config inspect", names=(KEN_CONFIG,))
def ken_config_nested_deep(ctx: Ctx):
    ken = ctx.copy()
    path = ken / KEN_CONFIG
    path.write_text(with_first_key(path.read_text(), "nest", nested()))
    return ken


@case("c5", "subnetwork apply", names=(MODEL_CONFIG,))
def model_config_nested_deep(ctx: Ctx):
    ken = ctx.copy()
    path = ken / MODEL_CONFIG
    path.write_text(with_first_key(path.read_text(), "nest", nested()))
    return ken


@case("c5", "apply", expect="ok_or_refused", names=(INDEX,))
def output_index_nested_deep(ctx: Ctx):
    ken = ctx.copy()
    _stale_index(ctx, None, text='{"weight_map": ' + nested() + "}")
    return ken


@case("c5", "apply", expect="ok_or_refused", names=(INDEX, "weight_map"))
def output_index_weight_map_a_list(ctx: Ctx):
    return _apply_with_stale_index(ctx, ["model-00001-of-00002.safetensors"])


@case("c5", "apply", expect="ok_or_refused", names=(INDEX, "weight_map"))
def output_index_weight_map_of_numbers(ctx: Ctx):
    return _apply_with_stale_index(ctx, {"w": 5})


@case("c5", "inspect", names=(SUBNETWORK, Q, "shape"))
def shape_a_string(ctx: Ctx):
    kf = KenFile(ctx.copy())
    kf.entry(Q)["shape"] = "384,384"
    kf.save()
    return kf.folder


@case("c5", "inspect", names=(SUBNETWORK, Q, "shape"))
def shape_of_lists(ctx: Ctx):
    kf = KenFile(ctx.copy())
    kf.entry(Q)["shape"] = [[384], [384]]
    kf.save()
    return kf.folder


@case("c5", "inspect", names=(SUBNETWORK, Q, "count"))
def count_a_string(ctx: Ctx):
    kf = KenFile(ctx.copy())
    kf.entry(Q)["count"] = "6144"
    kf.save()
    return kf.folder


@case("c5", "auto", names=(MODEL_CONFIG, "model_type"))
def model_type_missing(ctx: Ctx):
    ken = ctx.copy()
    config = read_json(ken / MODEL_CONFIG)
    del config["model_type"]
    write_json(ken / MODEL_CONFIG, config)
    return ken


@case("c5", "auto", names=(MODEL_CONFIG, "model_type"))
def model_type_unknown(ctx: Ctx):
    ken = ctx.copy()
    write_json(ken / MODEL_CONFIG, read_json(ken / MODEL_CONFIG) | {"model_type": "no-such"})
    return ken


@case("c5", "auto", names=(MODEL_CONFIG, "model_type"))
def model_type_a_number(ctx: Ctx):
    ken = ctx.copy()
    write_json(ken / MODEL_CONFIG, read_json(ken / MODEL_CONFIG) | {"model_type": 5})
    return ken


@case("c5", "subnetwork", names=(MODEL_CONFIG,))
def model_config_a_list(ctx: Ctx):
    ken = ctx.copy()
    (ken / MODEL_CONFIG).write_text("[1, 2, 3]")
    return ken


@case("c5", "apply", names=(MODEL_CONFIG, "architectures"))
def model_config_architectures_of_numbers(ctx: Ctx):
    ken = ctx.copy()
    write_json(ken / MODEL_CONFIG, read_json(ken / MODEL_CONFIG) | {"architectures": [5]})
    return ken


@case("c5", "subnetwork", names=(MODEL_CONFIG,))
def model_config_not_utf8(ctx: Ctx):
    ken = ctx.copy()
    (ken / MODEL_CONFIG).write_bytes(b'{"model_type": "bert", "name": "\xff\xfe"}')
    return ken


def _config_field(name: str, value):
    def prepare(ctx: Ctx):
        ken = ctx.copy()
        edit_ken_config(ken, **{name: value})
        return ken

    prepare.__name__ = f"{name}_{type(value).__name__}"
    return prepare


for _name, _value in [
    ("base_model_name_or_path", 42),
    ("compat", "false"),
    ("k", "16"),
    ("seed", "0"),
    ("rule", "evil"),
    ("target_modules", 5),
    ("base_model_revision", 3),
    ("base_model_dtype", 32),
    ("model_class", 7),
    ("library_version", ["0.1.0"]),
]:
    case("c5", "config", names=(KEN_CONFIG, _name))(_config_field(_name, _value))


@case("c5", "auto", names=(KEN_CONFIG, "base_model_name_or_path"))
def base_a_list(ctx: Ctx):
    ken = ctx.copy()
    edit_ken_config(ken, base_model_name_or_path=["hostile", "base"])
    return ken


@case("c5", "config", names=(KEN_CONFIG, "keep_ratio"))
def keep_ratio_nan(ctx: Ctx):
    ken = ctx.copy()
    edit_ken_config(ken, k=None, keep_ratio=float("nan"))
    return ken


@case("c5", "config", names=(KEN_CONFIG, "k"))
def required_key_missing(ctx: Ctx):
    ken = ctx.copy()
    edit_ken_config(ken, k=DELETE)
    return ken


@case("c5", "config", names=(KEN_CONFIG,))
def ken_config_a_list(ctx: Ctx):
    ken = ctx.copy()
    (ken / KEN_CONFIG).write_text("[]")
    return ken


@case("c5", "config", names=(KEN_CONFIG,))
def ken_config_not_utf8(ctx: Ctx):
    ken = ctx.copy()
    (ken / KEN_CONFIG).write_bytes(b"\xff\xfe" + (ken / KEN_CONFIG).read_bytes())
    return ken


@case("c5", "kenmodel", names=(Q,))
def float64_delta_for_a_float32_tensor(ctx: Ctx):
    kf = KenFile(ctx.copy())
    entry = kf.entry(Q)
    changed = entry["changed"]
    planes = kf.unpacked(Q, "difference").reshape(4, changed)
    zigzag = np.ascontiguousarray(planes.T).view("<u4").reshape(-1).astype("<u8")
    kf.set_packed(Q, "difference", np.ascontiguousarray(zigzag.view(np.uint8).reshape(-1, 8).T))
    entry["dtype"], entry["sizes"][2] = "float64", changed * 8
    kf.reseal(Q)
    kf.save()
    return kf.folder


@case("c5", "subnetwork", names=(SUBNETWORK, (CB, f"{CB}2")))
def byte_ranges_alias(ctx: Ctx):
    """A second tensor whose array is the first one's bytes (the same byte range)."""
    kf = KenFile(ctx.copy())
    kf.document["tensors"][f"{CB}2"] = copy.deepcopy(kf.entry(CB))

    def alias(header: dict) -> None:
        header[f"whole.{CB}2"] = dict(header[f"whole.{CB}"])

    kf.save(edit_header=alias)
    return kf.folder


@case("c5", "subnetwork", names=(SUBNETWORK,))
def byte_ranges_overlap(ctx: Ctx):
    """An extra raw tensor whose bytes lie inside another array's."""
    kf = KenFile(ctx.copy())
    begin = kf.layout()[f"whole.{CW}"][0] + 4
    inside = kf.data()[begin : begin + 16]
    kf.document["tensors"]["classifier.extra"] = {
        "kind": "whole",
        "shape": [4],
        "dtype": "float32",
        "codec": "none",
        "checksums": [array_checksum(inside, [4])],
    }

    def overlap(header: dict) -> None:
        header["whole.classifier.extra"] = {
            "dtype": "F32",
            "shape": [4],
            "data_offsets": [begin, begin + 16],
        }

    kf.save(edit_header=overlap)
    return kf.folder


@case("c5", "subnetwork", names=(SUBNETWORK,))
def byte_ranges_leave_a_gap(ctx: Ctx):
    kf = KenFile(ctx.copy())
    first = next(iter(kf.arrays))
    end = kf.layout()[first][1]

    def shift(header: dict) -> None:
        for key, record in header.items():
            if key not in ("__metadata__", first):
                record["data_offsets"] = [o + 8 for o in record["data_offsets"]]

    data = kf.data()
    kf.save(edit_header=shift, data=data[:end] + bytes(8) + data[end:])
    return kf.folder


@case("c5", "subnetwork", names=(SUBNETWORK,))
def bytes_after_the_last_array(ctx: Ctx):
    kf = KenFile(ctx.copy())
    kf.save(data=kf.data() + bytes(64))
    return kf.folder


# c6: other checks of the format ---------------------------------------------------------
@case("c6", "subnetwork", names=(SUBNETWORK, Q))
def delta_statistics_nan(ctx: Ctx):
    kf = KenFile(ctx.copy())
    kf.entry(Q)["delta"] = [float("nan"), 0.001]
    kf.save()
    return kf.folder


@case("c6", "subnetwork", names=(SUBNETWORK, Q))
def delta_statistics_infinite(ctx: Ctx):
    kf = KenFile(ctx.copy())
    kf.entry(Q)["delta"] = [0.001, float("inf")]
    kf.save()
    return kf.folder


@case("c6", "subnetwork", names=(SUBNETWORK, Q))
def fingerprint_not_hex(ctx: Ctx):
    kf = KenFile(ctx.copy())
    kf.document["fingerprints"][Q] = "z" * 32
    kf.save()
    return kf.folder


@case("c6", "subnetwork inspect", names=(SUBNETWORK, "attention.self.query"))
def tensor_name_with_control_characters(ctx: Ctx):
    kf = KenFile(ctx.copy())
    kf.rename_tensor(Q, Q.replace("layer.0.", "layer.0\n\x1b[2J\r."))
    kf.save()
    return Target(kf.folder, args=["--tensors"] if ctx.case.entry == "inspect" else [])


@case("c6", "subnetwork", names=(SUBNETWORK, CB))
def duplicate_key_in_the_safetensors_header(ctx: Ctx):
    kf = KenFile(ctx.copy())
    bogus = json.dumps({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})
    kf.save(header_text=lambda text: with_first_key(text, f"whole.{CB}", bogus))
    return kf.folder


@case("c6", "subnetwork", names=(SUBNETWORK, "tensors"))
def duplicate_key_in_the_ken_document(ctx: Ctx):
    kf = KenFile(ctx.copy())
    kf.save(document_text=with_first_key(json.dumps(kf.document), "tensors", "{}"))
    return kf.folder


@case("c6", "config", names=(KEN_CONFIG, "base_model_name_or_path"))
def duplicate_key_in_ken_config(ctx: Ctx):
    ken = ctx.copy()
    path = ken / KEN_CONFIG
    path.write_text(with_first_key(path.read_text(), *BASE_FIELD, '"hostile/other-base"'))
    return ken


@case("c6", "subnetwork", names=(SUBNETWORK, Q, "shape"))
def shape_of_booleans(ctx: Ctx):
    kf = KenFile(ctx.copy())
    kf.entry(Q)["shape"] = [True, 384 * 384]
    kf.reseal(Q)
    kf.save()
    return kf.folder


def _index_list_edit(ctx: Ctx, edit) -> Path:
    """Tensor D's index list, changed by ``edit(positions)`` (in place), resealed."""
    kf = KenFile(ctx.copy())
    positions = _kept_positions(kf, D)
    edit(positions)
    kf.set_packed(D, "kept", positions.astype("<u4").tobytes())
    kf.reseal(D)
    kf.save()
    return kf.folder


@case("c6", "subnetwork", names=(SUBNETWORK, D))
def index_out_of_range(ctx: Ctx):
    def edit(positions):
        positions[-1] = 384 * 1536

    return _index_list_edit(ctx, edit)


@case("c6", "subnetwork", names=(SUBNETWORK, D))
def indices_not_increasing(ctx: Ctx):
    def edit(positions):
        positions[[0, 1]] = positions[[1, 0]]

    return _index_list_edit(ctx, edit)


V1_TENSOR = "bert.encoder.layer.0.intermediate.dense.weight"  # [32, 16]: uint16 indices


@case("c6", "subnetwork", names=(SUBNETWORK, V1_TENSOR))
def version_1_index_out_of_range(ctx: Ctx):
    kf = KenFile(ctx.copy("v1"))
    mask = kf.arrays.pop(f"pruned.{V1_TENSOR}.mask")
    positions = np.flatnonzero(
        np.unpackbits(np.frombuffer(mask.data, np.uint8), count=512, bitorder="little")
    )
    positions[-1] = 512
    kf.entry(V1_TENSOR)["encoding"] = "indices"
    data = positions.astype("<u2").tobytes()
    kf.set_array(f"pruned.{V1_TENSOR}.indices", data, dtype="U16", shape=[len(positions)])
    kf.reseal(V1_TENSOR)
    kf.save()
    return kf.folder


@case("c6", "subnetwork", names=(SUBNETWORK, Q))
def version_1_delta_statistics_nan(ctx: Ctx):
    kf = KenFile(ctx.copy("v1"))
    kf.entry(Q)["delta"] = [float("nan"), 0.0]
    kf.save()
    return kf.folder


@case("c6", "inspect", names=(SUBNETWORK, Q, "shape"))
def version_1_shape_a_string(ctx: Ctx):
    kf = KenFile(ctx.copy("v1"))
    kf.entry(Q)["shape"] = "16x16"
    kf.save()
    return kf.folder


@case("c6", "config", names=(KEN_CONFIG,))
def ken_config_a_folder(ctx: Ctx):
    ken = ctx.copy()
    (ken / KEN_CONFIG).unlink()
    (ken / KEN_CONFIG).mkdir()
    return ken


@case("c6", "subnetwork", names=(SUBNETWORK,))
def subnetwork_file_a_fifo(ctx: Ctx):
    ken = ctx.copy()
    (ken / SUBNETWORK).unlink()
    os.mkfifo(ken / SUBNETWORK)
    return ken


@case("c6", "subnetwork", names=(PREVIOUS,))
def previous_version_nested_deep(ctx: Ctx):
    ken = ctx.copy()
    shutil.copyfile(ken / SUBNETWORK, ken / PREVIOUS)
    _other_save(ken)
    kf = KenFile(ken, PREVIOUS)
    kf.save(header_text=lambda text: with_first_key(text, "nest", nested()), update_config=False)
    return ken


@case("c6", "subnetwork", names=(SUBNETWORK,))
def format_version_unknown(ctx: Ctx):
    kf = KenFile(ctx.copy())
    kf.metadata["format_version"] = "4"  # 1 to 3 are read; 3 adds grown tensors to 2
    kf.save()
    return kf.folder


@case("c6", "subnetwork", names=(SUBNETWORK, CB))
def byte_range_past_the_end(ctx: Ctx):
    kf = KenFile(ctx.copy())

    def stretch(header: dict) -> None:
        header[f"whole.{CB}"]["data_offsets"][1] += 4096

    kf.save(edit_header=stretch)
    return kf.folder


# -- the test ---------------------------------------------------------------------------------
def _named(message: str, name: str | tuple[str, ...]) -> bool:
    """Whether ``name`` (or one of a tuple of names) occurs in ``message`` as a whole word
    (or file or tensor name)."""
    if isinstance(name, tuple):
        return any(_named(message, one) for one in name)
    return re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", message) is not None


def _describe(result: dict) -> str:
    shown = {k: result.get(k) for k in ("outcome", "type", "exit_code", "elapsed", "message")}
    text = json.dumps({k: v for k, v in shown.items() if v is not None})
    if result.get("traceback"):
        text += "\n" + result["traceback"][-2500:]
    if result.get("stderr"):
        text += "\nstderr: " + result["stderr"][-1500:]
    return text


def _verdict(case: Case, ctx: Ctx, result: dict) -> tuple[str, str | None, list[str]]:
    """``("ok" | "refused" | "bad", message, problems)`` for the child's report."""
    outcome, problems = result["outcome"], []
    if outcome in ("timeout", "died", "harness"):
        return "bad", None, [f"{outcome}: {result.get('message')}"]
    if case.entry in ("inspect", "viz", "apply"):
        command = case.entry
        if outcome == "raised":
            return "bad", None, [f"ken {command} let {result['type']} escape (a bug)"]
        if result["exit_code"] == 0:
            return "ok", None, problems
        lines = [line for line in result["stderr"].splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith(f"ken {command}: error: ")]
        if result["exit_code"] != 2:
            problems.append(f"exit code {result['exit_code']!r}, not 2")
        if len(errors) != 1 or "Traceback" in result["stderr"]:
            problems.append(f"stderr is not one 'ken {command}: error:' line")
        return "refused", errors[-1] if errors else "", problems
    if outcome == "ok":
        return "ok", None, problems
    if not set(case.errors) & set(result["mro"]):
        problems.append(f"{result['type']} is not a refusal ({' or '.join(case.errors)})")
    return "refused", result["message"], problems


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_file(case: Case, assets, hub, runner, tmp_path):
    ctx = Ctx(tmp_path / "case", assets, hub, case)
    target = case.prepare(ctx)
    target = target if isinstance(target, Target) else Target(target)
    request = ctx.request(target)
    before = ctx.snapshot()
    result = runner.run(request)
    after = ctx.snapshot()

    how, message, problems = _verdict(case, ctx, result)
    if case.expect == "refused" and how == "ok":
        problems.append("accepted")
    if case.expect == "ok" and how == "refused":
        problems.append("refused")
    if case.expect == "no_code":  # any end but a hang or a dead process
        problems = [p for p in problems if p.startswith(("timeout", "died", "harness"))]
    elif how == "refused":
        missing = [name for name in case.names if not _named(message or "", name)]
        if missing:
            problems.append(f"the message does not name {missing}")
        if result["elapsed"] > REFUSAL_SECONDS:
            problems.append(f"refused after {result['elapsed']:.2f} s")
    if case.max_seconds is not None and result.get("elapsed", 0) > case.max_seconds:
        problems.append(f"took {result['elapsed']:.2f} s")
    if how == "ok":
        problems += [f"not so: {what}" for what, check in ctx.ok_checks if not check()]
        if case.logits and case.entry in ("auto", "kenmodel"):
            logits = torch.tensor(result.get("logits", []))
            expected = assets.logits[case.logits]
            if logits.shape != expected.shape or not torch.allclose(logits, expected, atol=1e-5):
                problems.append(f"logits {logits.tolist()} != {expected.tolist()}")
    changed = sorted(
        path for path in before.keys() | after.keys() if before.get(path) != after.get(path)
    )
    if changed:
        problems.append(f"changed or created outside the output: {changed[:4]}")
    if ctx.marker.exists():
        problems.append("custom code ran (the marker exists)")
    if "[y/N]" in result.get("stdout", "") + result.get("stderr", ""):
        problems.append("prompted for trust_remote_code")
    if ctx.secret is not None and ctx.out.exists():
        leaked = [p for p in ctx.out.rglob("*") if p.is_file() and ctx.secret in p.read_bytes()]
        if leaked:
            problems.append(f"data read through a link was written to {leaked}")
    assert not problems, f"{case.id}: {'; '.join(problems)}\n{_describe(result)}"
    shutil.rmtree(ctx.root, ignore_errors=True)  # some cases write tens of MB


def test_the_catalogue_covers_every_class_and_entry_point():
    """At least 80 hostile cases, over every class and every entry point; ids unique."""
    hostile = [c for c in CASES if c.klass != "c0"]
    assert len(hostile) >= 80
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.klass for c in CASES} == {f"c{i}" for i in range(7)}
    entries = {"config", "subnetwork", "auto", "kenmodel", "inspect", "viz", "apply"}
    assert {c.entry for c in hostile} == entries
