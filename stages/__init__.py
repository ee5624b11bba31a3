"""Stage scripts of the image-classification pipeline and the modules they share.

Each `stages/<stage>.py` is run by dvc.yaml as `python -m stages.<stage>`;
the other modules hold the logic that stages, tests and sweeps import.
"""
