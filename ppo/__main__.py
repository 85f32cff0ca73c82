from common.config import skipped_before_training
from ppo.config import PPOStageConfig, stage_inputs

if not skipped_before_training(PPOStageConfig, "ppo", stage_inputs):
    from common.errors import run_cli
    from ppo.train import main

    run_cli(main, stage="ppo", batch_options="micro_batch_size or generation_batch_size")
