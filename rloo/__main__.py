from common.config import config_if_up_to_date
from rloo.config import RLOOStageConfig, stage_inputs

if config_if_up_to_date(RLOOStageConfig, "rloo", stage_inputs) is None:
    from common.errors import run_cli
    from rloo.train import main

    run_cli(main, stage="rloo", batch_options="per_device_train_batch_size (raise gradient_accumulation_steps to "
                                              "keep the batch)")
