"""Making a dataset folder (:mod:`gstalk.io.dataset`): from a phone clip
(:func:`prepare`, ``gstalk prepare``) or from a folder laid out for the public NeRF/3DGS
talking-head projects (:func:`import_nerf_dataset`, ``gstalk import-dataset``); both share
:mod:`gstalk.prepare.common`."""

from gstalk.prepare.common import ClipTooShortError, NoFaceError, check_dataset_out
from gstalk.prepare.nerf import import_nerf_dataset
from gstalk.prepare.video import check_options, prepare

__all__ = ["ClipTooShortError", "NoFaceError", "check_dataset_out", "check_options", "import_nerf_dataset", "prepare"]
