"""Stand-ins for the helpers the vendored tests import from diffusers' test tree (tests/testing_utils.py,
tests/others/test_utils.py), which is not part of the installed package."""
import io
import logging
import unittest

torch_device = "cpu"  # these tests run on the CPU only
TOKEN = USER = None
# the Hub staging tests push to and pull from huggingface.co: nothing here may use the network
is_staging_test = unittest.skip("needs the Hugging Face Hub staging server (network)")


class CaptureLogger:
    """Collects what a ``logging.Logger`` writes inside a ``with`` block into ``.out`` (diffusers' helper)."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self.io = io.StringIO()
        self.sh = logging.StreamHandler(self.io)
        self.out = ""

    def __enter__(self):
        self.logger.addHandler(self.sh)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.sh)
        self.out = self.io.getvalue()
