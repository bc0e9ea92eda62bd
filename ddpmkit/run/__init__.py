"""What a run is: its config, data, components, checkpoints, the guide's run, event hooks and the run lock."""
