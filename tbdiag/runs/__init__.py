"""The training run folder: its configuration and its files, shared by `train` and `report`."""
