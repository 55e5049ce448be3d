"""GPU kernels. Each module imports ``triton`` itself, so importing ``nova`` never needs it."""
