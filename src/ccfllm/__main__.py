"""`python -m ccfllm`: the `ccfllm` command, as launchers start it (`accelerate launch -m ccfllm train`)."""

from .cli import main

main(prog_name="ccfllm")
