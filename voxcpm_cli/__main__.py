"""`python -m voxcpm_cli` and `torchrun -m voxcpm_cli` run the same app as `voxcpm`."""

from voxcpm_cli.main import main

if __name__ == "__main__":
    main()
