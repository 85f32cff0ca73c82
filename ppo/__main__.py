from common.config import config_if_up_to_date
from ppo.config import PPOStageConfig, stage_inputs

if config_if_up_to_date(PPOStageConfig, "ppo", stage_inputs) is None:
    from common.errors import run_cli
    from ppo.train import main

    run_cli(main, stage="ppo", batch_options="micro_batch_size or generation_batch_size")
