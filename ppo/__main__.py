from common.errors import run_cli
from ppo.train import main

run_cli(main, stage="ppo", batch_options="micro_batch_size or generation_batch_size")
