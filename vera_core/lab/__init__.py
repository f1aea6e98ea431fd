"""The lab: data, training, comparison, reports, run folders, memory tracking and estimation, plots and the CLI.

It builds on the adapter library (`vera_core.adapters`) and never the other way round. Modules load on first use
(`vera_core.lab.compare`, `vera_core.lab.train`, ...), so importing the package itself costs nothing.
"""
