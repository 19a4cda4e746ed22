"""push_to_hub and from_pretrained("user/repo") through the real huggingface_hub client,
against a fake Hub endpoint on localhost (the only part that is faked)."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForSequenceClassification

from fake_hub import FakeHub, hub_process, run_against_hub
from ken_hf import KENConfig, KENSubnetwork
from ken_hf.config import CONFIG_NAME
from ken_hf.storage.subnetwork_file import SUBNETWORK_NAME, read_subnetwork

BASE_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the packaged base's id on the Hub


def test_push_publishes_only_the_subnetwork_and_loads_back_by_repo_id(minilm_finetune, tmp_path):
    base = AutoModelForSequenceClassification.from_pretrained(minilm_finetune["base"], num_labels=2)
    config = KENConfig(keep_ratio=0.25, base_model_name_or_path=minilm_finetune["base"])
    subnetwork = KENSubnetwork.from_weights(
        base, minilm_finetune["model"], config, new_tensors=minilm_finetune["new"], progress=False
    )
    folder = tmp_path / "local"
    subnetwork.save_pretrained(folder)
    with FakeHub() as hub:
        cache = str(tmp_path / "hf-home")
        # The base is the packaged folder; pushed, the subnetwork names the base's Hub id
        # (a subnetwork with a local base is not pushed: test_peft_names.py).
        run_against_hub(
            f"""
            from ken_hf import KENSubnetwork
            url = KENSubnetwork.from_pretrained({str(folder)!r}).push_to_hub(
                "me/minilm-ken", base_model_name_or_path={BASE_HUB_ID!r}
            )
            print(url)
            """,
            hub.url,
            cache,
        )
        assert sorted(hub.repos["me/minilm-ken"]) == sorted(
            ["README.md", "config.json", CONFIG_NAME, SUBNETWORK_NAME]
        )
        pushed_config = json.loads(hub.repos["me/minilm-ken"][CONFIG_NAME])
        assert pushed_config["base_model_name_or_path"] == BASE_HUB_ID
        (tmp_path / "pushed.safetensors").write_bytes(hub.repos["me/minilm-ken"][SUBNETWORK_NAME])
        pushed = read_subnetwork(tmp_path / "pushed.safetensors")
        for name, pruned in subnetwork.pruned.items():
            assert torch.equal(pushed.pruned[name].difference, pruned.difference)
            assert torch.equal(pushed.pruned[name].positions, pruned.positions)
        # A repository whose subnetwork names a local folder as its base (uploaded as any
        # stranger could): from the Hub, that is refused unless the user names the base.
        hub.add_repo("me/local-base", {p.name: p.read_bytes() for p in folder.iterdir()})
        refused = hub_process(_logits_script("me/local-base"), hub.url, cache)
        assert refused.returncode != 0 and "UnsafePathError" in refused.stderr
        assert "base_model_name_or_path=" in refused.stderr
        seen = len(hub.requests)
        base = minilm_finetune["base"]
        remote = run_against_hub(_logits_script("me/minilm-ken", base), hub.url, cache)
        assert _downloads(hub.requests[seen:]), "the first load downloaded nothing"
        # Loaded again, online: huggingface_hub may check the revision, but every file comes
        # from its cache, so the server is asked for no file content.
        seen = len(hub.requests)
        again = run_against_hub(_logits_script("me/minilm-ken", base), hub.url, cache)
        assert _downloads(hub.requests[seen:]) == []
        # And with HF_HUB_OFFLINE=1, while the server still answers: not a single request.
        seen = len(hub.requests)
        cached = run_against_hub(
            _logits_script("me/minilm-ken", base), hub.url, cache, offline=True
        )
        assert hub.requests[seen:] == []
    local = run_against_hub(_logits_script(str(folder)), hub.url, cache, offline=True)
    assert json.loads(remote) == json.loads(local) == json.loads(again) == json.loads(cached)


def _downloads(requests: list[str]) -> list[str]:
    """The requests among ``requests`` that fetched a file's content from the repository."""
    return [r for r in requests if r.startswith("GET /me/minilm-ken/resolve/")]


def _logits_script(source: str, base: str | None = None) -> str:
    return f"""
    import json, torch
    from ken_hf import AutoKENModelForSequenceClassification
    model = AutoKENModelForSequenceClassification.from_pretrained(
        {source!r}, base_model_name_or_path={base!r}
    )
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])).logits
    print(json.dumps(logits.tolist()))
    """
