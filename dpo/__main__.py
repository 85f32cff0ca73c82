from common.config import config_if_up_to_date
from dpo.config import DPOStageConfig, stage_inputs

if config_if_up_to_date(DPOStageConfig, "dpo", stage_inputs) is None:
    from common.errors import run_cli
    from dpo.train import main

    run_cli(main, stage="dpo", batch_options="per_device_train_batch_size (raise gradient_accumulation_steps to "
                                             "keep the batch) or max_length")
