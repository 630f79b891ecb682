"""gstalk: talking-head Gaussian-splatting avatars from a phone clip."""

__version__ = "0.1.0"
