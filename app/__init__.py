"""VeRA Lab's Gradio app: `python -m app` (app/ui.py: layout, app/jobs.py: job control, app/views.py: what it shows)."""
from .ui import build_app, launch

__all__ = ["build_app", "launch"]
