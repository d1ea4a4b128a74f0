"""The trainer: the program that runs in the GPU pod (or locally via `kubetune run`)."""
