from pathlib import Path

from common.config import config_if_up_to_date
from evaluation.config import EvalConfig, stage_inputs

up_to_date = config_if_up_to_date(EvalConfig, "eval", stage_inputs)
if up_to_date is not None:
    from evaluation.report import print_headline

    print_headline(Path(up_to_date.output_dir))
else:
    from common.errors import run_cli
    from evaluation.evaluate import main

    run_cli(main, stage="eval", batch_options="batch_size")
