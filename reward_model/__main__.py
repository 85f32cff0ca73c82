from common.errors import run_cli
from reward_model.train import main

run_cli(main, stage="rm", batch_options="per_device_train_batch_size or per_device_eval_batch_size")
