from common.errors import run_cli
from ppo.train import main

run_cli(main)
