from common.config import config_if_up_to_date
from reward_model.config import RewardStageConfig, stage_inputs

if config_if_up_to_date(RewardStageConfig, "rm", stage_inputs) is None:
    from common.errors import run_cli
    from reward_model.train import main

    run_cli(main, stage="rm", batch_options="per_device_train_batch_size or per_device_eval_batch_size")
