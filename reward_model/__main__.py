from common.errors import run_cli
from reward_model.train import main

run_cli(main)
