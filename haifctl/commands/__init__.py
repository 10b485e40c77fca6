"""One module per command group; :mod:`haifctl.cli` wires them together."""
