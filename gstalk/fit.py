"""prepare + track + train in one call: what ``gstalk fit`` and each task of ``gstalk
fit-batch`` run. Every stage resumes where a stopped run left it (the dataset's
progress.json, track.npz, the trainer's checkpoint), which is what makes a re-run or a retry
safe."""

from __future__ import annotations

from pathlib import Path

from gstalk.config import PrepareOptions, TrackOptions, TrainOptions


def default_dataset(avatar: str | Path) -> Path:
    """Where a fit's dataset goes by default: AVATAR.dataset beside the avatar."""
    return Path(str(avatar).rstrip("/") + ".dataset")


def check_fit_options(prepare: PrepareOptions, track: TrackOptions, train: TrainOptions) -> None:
    """Every stage's options (and the head-model files), before the first stage's work; a
    wrong one raises a GstalkError naming its flag."""
    from gstalk.config import resolve_device
    from gstalk.head.tracker import check_inputs as check_track_files, check_options as check_track
    from gstalk.prepare import check_options as check_prepare
    from gstalk.train.trainer import resolved

    check_prepare(prepare, "prepare.")
    check_track(track, "track.")
    check_track_files(track)  # the FLAME and embedding files too, not only after the whole prepare
    resolved(train, resolve_device(train.device), "train.")


def fit(clip: str | Path, avatar: str | Path, dataset: str | Path | None, prepare: PrepareOptions,
        track: TrackOptions, train: TrainOptions, progress=None, log=print) -> Path:
    """Fit the avatar folder ``avatar`` to ``clip`` (its dataset in ``dataset``, by default
    :func:`default_dataset`); returns the avatar folder."""
    from gstalk.avatar.io import claim_avatar_folder
    from gstalk.head.tracker import track_dataset
    from gstalk.prepare import check_dataset_out, prepare as prepare_clip
    from gstalk.train.trainer import train as train_avatar

    check_fit_options(prepare, track, train)
    ds_dir = Path(dataset) if dataset else default_dataset(avatar)
    check_dataset_out(ds_dir)  # both output folders, before the first stage
    claim_avatar_folder(avatar, train.overwrite, "--train.overwrite")
    prepare_clip(clip, ds_dir, prepare, progress=progress, log=log)
    if not (ds_dir / "track.npz").is_file():
        track_dataset(ds_dir, track, progress=progress, log=log)
    return train_avatar(ds_dir, avatar, train, progress=progress, log=log)
