from common.config import skipped_before_training
from reward_model.config import RewardStageConfig, stage_inputs

if not skipped_before_training(RewardStageConfig, "rm", stage_inputs):
    from common.errors import run_cli
    from reward_model.train import main

    run_cli(main, stage="rm", batch_options="per_device_train_batch_size or per_device_eval_batch_size")
