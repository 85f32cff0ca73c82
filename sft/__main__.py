from common.config import skipped_before_training
from sft.config import SFTStageConfig, stage_inputs

if not skipped_before_training(SFTStageConfig, "sft", stage_inputs):
    from common.errors import run_cli
    from sft.train import main

    run_cli(main, stage="sft", batch_options="per_device_train_batch_size (raise gradient_accumulation_steps to "
                                             "keep the batch) or max_length")
