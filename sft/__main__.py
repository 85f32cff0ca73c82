from common.errors import run_cli
from sft.train import main

run_cli(main)
