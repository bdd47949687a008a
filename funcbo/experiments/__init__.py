"""The experiment layer: configs, resumable runs, sweeps and reports, generic over applications."""
