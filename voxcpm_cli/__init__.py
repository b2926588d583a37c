"""voxcpm_cli: the `voxcpm` command line, a thin layer over voxcpm_core."""
