"""Pushing the subnetwork a ``KENCallback`` saved to its Trainer's Hub repository.

Into the place the Trainer's own ``push_to_hub`` of ``output_dir`` gives the folder (the
subfolder ``ken/`` by default), with the Trainer's ``hub_token``, ``hub_private_repo`` and
``hub_revision``, after the uploads the Trainer still has in flight.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import Trainer

from .config import KENConfig
from .errors import KENConfigError, shown
from .storage.folder import push_subnetwork_folder, travelling_base
from .utils.hub import is_remote_id

logger = logging.getLogger(__name__)


def trainer_repo_id(trainer: Trainer) -> str:
    """The repository the Trainer pushes to, as its own ``push_to_hub`` names it."""
    args = trainer.args
    return (
        getattr(trainer, "hub_model_id", None)
        or args.hub_model_id
        or Path(args.output_dir).absolute().name
    )


def check_hub_base_model(hub_base_model: str | None) -> None:
    """Refuse a ``hub_base_model`` that is not a Hub id (``KENConfigError``)."""
    if hub_base_model is not None and not is_remote_id(hub_base_model):
        raise KENConfigError(
            f"hub_base_model={shown(hub_base_model)} is not a Hub id ('owner/name', and no "
            "local path of that name): give the Hub id of the base"
        )


def check_pushed_base(trainer: Trainer, base: str | None, hub_base_model: str | None) -> None:
    """Refuse a push whose recorded ``base`` is a local path when no ``hub_base_model``
    names its Hub id (``travelling_base``): said when training begins, before any work."""
    travelling_base(
        base,
        hub_base_model,
        repo_id=trainer_repo_id(trainer),
        remedy="KENCallback(..., hub_base_model='owner/name'), the base's Hub id",
        argument="hub_base_model",
    )


def push_to_trainer_repo(trainer: Trainer, folder: Path, hub_base_model: str | None) -> str:
    """Push the saved subnetwork ``folder`` to the Trainer's repository (``folder``'s path
    inside ``output_dir``, else ``ken``), naming ``hub_base_model`` as its base when given.
    Returns the commit's URL; a failed push raises ``OSError`` saying that the folder is
    safe and giving the ``ken push`` command that pushes it again."""
    args = trainer.args
    repo_id = trainer_repo_id(trainer)
    recorded = KENConfig.from_pretrained(folder).base_model_name_or_path
    check_pushed_base(trainer, recorded, hub_base_model)
    try:
        path_in_repo = folder.resolve().relative_to(Path(args.output_dir).resolve()).as_posix()
    except ValueError:  # save_dir outside output_dir
        path_in_repo = "ken"
    revision = args.hub_revision  # a TrainingArguments field since transformers 4.51
    in_flight = getattr(trainer, "push_in_progress", None)
    if in_flight is not None:
        in_flight.wait_until_done()
    try:
        url = push_subnetwork_folder(
            folder,
            repo_id,
            base_model_name_or_path=hub_base_model,
            private=args.hub_private_repo,
            token=args.hub_token,
            revision=revision,
            path_in_repo=path_in_repo,
            commit_message="KEN subnetwork, end of training",
        )
    except Exception as error:  # network, permissions, unknown branch: all reported alike
        again = (
            f"ken push {folder} {repo_id} --subfolder {path_in_repo}"
            + (f" --revision {revision}" if revision else "")
            + (f" --base-model {hub_base_model}" if hub_base_model else "")
        )
        raise OSError(
            f"KENCallback: pushing the subnetwork to {repo_id} (subfolder {path_in_repo}) "
            f"failed: {error}. The subnetwork is saved and safe in {folder}; push it "
            f"again with: {again}"
        ) from error
    logger.info(f"KEN subnetwork pushed to {repo_id}/{path_in_repo}: {url}")
    return url
