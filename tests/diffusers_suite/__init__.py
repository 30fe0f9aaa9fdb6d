"""diffusers' own scheduler tests (huggingface/diffusers, tests/schedulers, Apache License 2.0, copyright
The HuggingFace Team), run against symfast's drop-in schedulers.

Source: branch v0.40.0-release (commit d035dcd7cc7c88e0a154609b62887d50bba9fdc2) of
github.com/huggingface/diffusers. The installed diffusers is 0.42.1, which has no tag in the mirror this
was taken from; its six scheduler sources (scheduling_ddpm/ddim/euler_discrete/euler_ancestral_discrete/
heun_discrete/dpmsolver_multistep.py and scheduling_utils.py) are byte-identical to that commit's, so
these are the tests for the installed code. Files: test_schedulers.py (SchedulerCommonTest and the config
tests) and the tests of the six classes; the only change to them is where they import from:

- ``_impl``: the six classes under test, symfast's by default; ``SYMFAST_DIFFUSERS_SUITE=diffusers``
  runs the same tests on diffusers' own classes (the reference: every test not skipped in conftest.py
  passes there too).
- ``_shim``: the few helpers they took from diffusers' test tree (which is not installed).

Tests that fail on diffusers' own classes or need the network are skipped in conftest.py with the reason.
"""
