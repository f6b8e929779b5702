"""Tools around the fedbat-flwr app: local runners, the deployment helper, sweeps, reports.

They start Flower and read the results contract; the ServerApp and ClientApp never import them,
and pyproject's `fab-exclude` keeps them out of the app bundle (FAB) Flower ships to every run.
"""
