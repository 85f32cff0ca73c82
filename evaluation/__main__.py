from common.errors import run_cli
from evaluation.evaluate import main

run_cli(main, stage="eval", batch_options="batch_size")
